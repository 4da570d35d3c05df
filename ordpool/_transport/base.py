"""The seam between the engine and whatever runs its batches: two protocols, checked by mypy.

A transport (local worker processes, Ray actors, an in-memory fake in the tests) implements
:class:`Transport`; the engine implements :class:`TransportEvents` and is the only thing a
transport reports to. The engine never probes a transport for optional methods: every
capability below is part of the contract, with a documented "none" value.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sized

from .wire import Payload

__all__ = ["Transport", "TransportEvents", "TransportFactory"]


class TransportEvents(Protocol):
    """What a transport reports, from its own thread(s), about the worker of a slot."""

    def on_ready(self, slot: int, pid: int) -> None:
        """The worker ran its ``init`` and takes tasks."""

    def on_init_error(self, slot: int, exc: BaseException) -> None:
        """The worker's ``init`` raised ``exc`` (the remote traceback is its ``__cause__``)."""

    def on_retire(self, slot: int) -> None:
        """The worker reached its task limit: send it nothing more; its exit follows."""

    def on_result(
        self, slot: int, bid: int, seconds: float, payload: Sized, nerrors: int = 0
    ) -> None:
        """The task ``bid`` was answered: the encoded results, the worker's seconds on it, and
        how many of its items failed (``wire.ALL_FAILED``: all of them)."""

    def on_part(self, slot: int, bid: int, lo: int, hi: int, payload: Sized) -> None:
        """The task ``bid`` is still running; the results of its positions ``lo`` to ``hi``
        are ready (encoded as a RESULT payload of ``hi - lo`` values). Its RESULT, later, still
        holds every position."""

    def on_death(
        self, slot: int, exitcode: int | None, pid: int, progress: tuple[int, int]
    ) -> None:
        """The worker process ``pid`` is gone. ``progress`` is ``(bid, position)`` of the item
        it was running (position == the task's length: it had run every item; -1: unknown)."""


class Transport(Protocol):
    """Starts the workers of a pool's slots and carries tasks to them.

    Attributes:
        batch_target: seconds of worker time a batch should take on this transport, or
            ``None`` for the engine's default (a Ray call has a high fixed cost: 0.05).
        max_payload: bytes of items (or results) a batch should stay under, or ``None``
            (local processes: what fits a shared-memory region).
        max_depth: the most tasks the worker of a slot can hold at once.
    """

    batch_target: float | None
    max_payload: int | None
    max_depth: int

    def start_workers(self, slots: list[int]) -> None:
        """Start the first workers; each reports READY (or an init error) later."""

    def start_worker(self, slot: int) -> None:
        """Start a replacement for the worker of ``slot``, reported dead before."""

    def send(
        self, slot: int, bid: int, failed: tuple[int, ...], payload: Payload, call: bytes
    ) -> None:
        """Send task ``bid`` to the worker of ``slot``; never waits for the worker.

        ``failed``: positions not to run; ``call``: the pickled callable of the task's stream,
        or ``b""`` for the pool's function."""

    def cancel(self, slot: int, bid: int, position: int) -> None:
        """Ask the running item ``(bid, position)`` of ``slot`` to stop (``cancelled()``)."""

    def cancel_all(self) -> None:
        """Ask every worker's running item to stop."""

    def kill(self, slot: int) -> None:
        """Kill the worker of ``slot`` at once; its death is reported as usual."""

    def stop(self, *, graceful: bool) -> None:
        """Stop every worker (after their tasks, if ``graceful``). Idempotent; a second call
        waits for the first."""

    def pids(self) -> dict[int, int]:
        """``{slot: pid}`` of the live workers."""


TransportFactory = Callable[[TransportEvents], Transport]
