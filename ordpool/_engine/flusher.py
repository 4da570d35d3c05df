"""The flusher: the partial-batch timer. Sends a partial batch once its oldest item has waited
``max_delay`` (a lone message on a quiet stream, items that came while every worker was busy),
in its own thread.

The flusher is not told about every new batch: producers wake it only when it sleeps idle
(nothing pending anywhere). Each stream notes when its oldest pending item arrived
(``Stream.pending_since``, once per batch); the flusher sleeps until the earliest of those plus
``max_delay``, and takes what is still pending then. While items flow, batches are cut first
(full, or for an idle worker) and the flusher finds nothing due; so an item waits in the parent
at most ``max_delay`` before it is sent, and a busy stream pays nothing per item.

It also ends the wait of an ordered stream's items held back by the cut pacing
(:meth:`.Scheduler.paced`) while a worker is idle, one more pace after the pace ended, if no
new item or result cut them first. (Under a steady stream the next item cuts them as the pace
ends; waking the thread then too would cost the parent a wake-up per pace for nothing.)
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .._core.state import ENDED
from .._core.streams import Stream
from .intake import Work

if TYPE_CHECKING:
    from .coordinator import Engine

__all__ = ["Flusher"]


class Flusher:
    """The ``ordpool-flusher`` thread of one engine.

    Attributes:
        max_delay: seconds a partial batch may wait before it is sent (0.005).
        idle: the thread sleeps until woken (nothing was pending): a producer that adds the
            first pending item wakes it (:meth:`wake_locked`).
    """

    __slots__ = ("cond", "engine", "idle", "max_delay", "thread")

    def __init__(self, engine: Engine, max_delay: float) -> None:
        self.engine = engine
        self.max_delay = max_delay
        self.cond = threading.Condition(engine.lock)
        self.idle = False
        self.thread = threading.Thread(target=self._loop, name="ordpool-flusher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake_locked(self) -> None:
        """A first item is pending (engine lock held): wake the thread if it sleeps idle."""
        if self.idle:
            self.cond.notify()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with engine.lock:
                if engine.state in ENDED:
                    return
                waiting = [
                    (s, s.next_seq)
                    for s in engine.streams
                    if not s.abandoned and not s.closed and s.pending()
                ]
                if not waiting:
                    self.idle = True
                    self.cond.wait()
                    self.idle = False
                    continue
                wait = self._until_due(waiting)
                if wait > 0:
                    self.cond.wait(wait)
                    continue  # look again: items may have been taken meanwhile
                works = engine.intake.take_for_idle_locked()
                works += self._take_aged_locked(waiting)
                if not works:
                    # Due but not to be cut now (the window is full, or a bulk stream's tasks
                    # already wait for every worker): look again after max_delay, not at once.
                    self.cond.wait(self.max_delay)
            for work in works:
                engine.intake.encode_dispatch(*work)

    def _until_due(self, waiting: list[tuple[Stream, int]]) -> float:
        """Seconds until the oldest pending item of ``waiting`` has waited ``max_delay``, or
        until one pace after the cut pacing let an ordered stream's items go to an idle worker
        (see the module's docstring); a stream whose clock is not started yet starts it now."""
        now = time.monotonic()
        due = now + self.max_delay
        scheduler = self.engine.scheduler
        idle = scheduler.idle and not scheduler.pending
        for stream, _ in waiting:
            if not stream.pending_since:
                stream.pending_since = now
            due = min(due, stream.pending_since + self.max_delay)
            if idle and stream.on_batch is None:
                due = min(due, scheduler.paced_until + scheduler.pace)
        return due - now

    def _take_aged_locked(self, waiting: list[tuple[Stream, int]]) -> list[Work]:
        """Take the pending items of each stream whose oldest has waited ``max_delay``."""
        engine = self.engine
        intake, scheduler = engine.intake, engine.scheduler
        works: list[Work] = []
        due = time.monotonic() - self.max_delay
        for stream, _ in waiting:
            if not stream.pending() or stream.abandoned or stream.pending_since > due:
                continue
            if stream.closed or engine.stopping:
                continue  # close() stopped its intake: nothing more goes out
            room = intake.window - intake.inflight
            if room <= 0:
                break
            if (
                stream.bulk
                and scheduler.queued_locked() >= engine.workers
                and not (stream.keyed and scheduler.has_items_for_free_slot(stream))
            ):
                # Tasks already wait for every worker: a bulk batch cut now would only wait
                # too, at a size chosen before results came back (its feeder holds back for
                # the same reason). A lone job of an indexed stream (a submit) still goes
                # after max_delay.
                continue
            # (an indexed stream's take ignores the limit: enqueue keeps its pending items
            # within the window, enqueue_many within it plus one batch)
            work = intake.take_locked(stream, limit=room)
            if work is not None:
                works.append(work)
        return works
