"""The moving parts of one open-loop run of ``ordpool bench --stream``: pacing, the producer,
and the consumer's in-order record. The arithmetic is in :mod:`.latency`.

::

    Pacer (the producer's clock)                  due(i) = start + i / rate
      waits for the next due time (sleeps; with --spin-us, spins its last microseconds),
      then hands out every item already due, as one batch
        |
        v
    the producer: a Producer thread calling enqueue()/submit() per item, or the pool's own
    feeder thread pulling a blocking generator (imap)
        |
        v
    the pool under test: worker processes run stream_work((i, work_us, slow_ms))
        |
        v
    the consumer (the main thread): each result, in input order -> Recorder.receive(i)
      checks that i is the next index (nothing lost, duplicated or reordered), stamps
      perf_counter(); latency[i] = received[i] - due(i), computed after the run

Every clock is ``time.perf_counter()``. The producer is late when the pool pushes back (a full
window, a slow ``submit``): that lateness counts in the latency, which is measured from the
due time, and :attr:`Pacer.max_lag` records how late the producer fed at worst.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from array import array
from typing import Any, Callable, Iterator

from .config import StreamCheckError
from .latency import Schedule, is_slow

__all__ = ["Items", "Pacer", "Producer", "Recorder", "fine_timer_slack", "wait_until"]

# Linux's prctl option numbers: a thread's timer slack, in nanoseconds.
_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30
_FINE_SLACK_NS = 1000


def wait_until(when: float, stop: threading.Event | None = None, spin: float = 0.0) -> None:
    """Return at ``perf_counter() >= when``, or once ``stop`` is set.

    Sleeps while ``when`` is more than ``spin`` seconds away, then spins. A spin is precise to
    a microsecond, but the spinning thread holds the GIL and a core, which the pool under test
    needs (see ``--spin-us`` in ``bench/README.md``); without it a sleep overshoots by the
    thread's timer slack and wake-up time (about 20 to 30 us under :func:`fine_timer_slack`).
    """
    clock = time.perf_counter
    while True:
        left = when - clock()
        if left <= 0 or (stop is not None and stop.is_set()):
            return
        if left > spin:
            time.sleep(left - spin)


@contextlib.contextmanager
def fine_timer_slack() -> Iterator[None]:
    """This thread's timer slack at 1 us meanwhile, then back to what it was (Linux; elsewhere
    nothing).

    The kernel lets a sleep end up to the timer slack late (50 us by default), so that wake-ups
    can be grouped: on the project's machine ``time.sleep`` overshot by 75 us at the median
    with the default slack, and by 20 to 30 us with 1 us.
    """
    zero = ctypes.c_ulong(0)
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        before = prctl(_PR_GET_TIMERSLACK, zero, zero, zero, zero)
        fine = ctypes.c_ulong(_FINE_SLACK_NS)  # prctl's arguments are unsigned longs
        changed = before > 0 and prctl(_PR_SET_TIMERSLACK, fine, zero, zero, zero) == 0
    except (AttributeError, OSError):
        changed = False
    try:
        yield
    finally:
        if changed:
            prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(before), zero, zero, zero)


class Items:
    """The item of each index: ``(i, work_us, slow_ms)``, ``slow_ms`` 0 but for the slow ones.

    >>> make = Items(work_us=8.0, slow_every=3, slow_ms=20.0)
    >>> [make(i) for i in range(3)]
    [(0, 8.0, 0.0), (1, 8.0, 0.0), (2, 8.0, 20.0)]
    """

    __slots__ = ("slow_every", "slow_ms", "work_us")

    def __init__(self, work_us: float, slow_every: int | None, slow_ms: float) -> None:
        self.work_us = work_us  # CPU per item, microseconds: 8.0
        self.slow_every = slow_every  # every N-th item sleeps instead: 2000, or None
        self.slow_ms = slow_ms  # how long it sleeps, milliseconds: 20.0

    def __call__(self, i: int) -> tuple[int, float, float]:
        slow = self.slow_ms if is_slow(i, self.slow_every) else 0.0
        return (i, self.work_us, slow)


class Pacer:
    """Hands out the items of a :class:`.latency.Schedule` as they come due.

    Each step waits for the next due time (:func:`wait_until`, under
    :func:`fine_timer_slack`), then takes every item due by then as one batch: a producer that
    was held up catches up in one go instead of one item per wait.

    Args:
        schedule: when each item is due.
        items: the item of each index.
        spin: seconds before each due time spent spinning instead of sleeping (``--spin-us``).
        tick: the shortest time between two wake-ups (``--tick-us``): items that come due
            meanwhile are handed out together at the next one (their latency still counts
            from their due time).
    """

    def __init__(
        self, schedule: Schedule, items: Items, spin: float = 0.0, tick: float = 0.0
    ) -> None:
        self.schedule = schedule
        self.items = items
        self.spin = spin
        self.tick = tick
        self.stop = threading.Event()  # set to end the feed early (the run is failing)
        self.fed = 0  # items handed out so far: 120_000
        self.batches_fed = 0  # batches handed out so far: 9_000
        self.max_lag = 0.0  # seconds the oldest item of a batch waited past its due time, at most
        self.total_lag = 0.0  # the same summed over the batches (for the mean): 0.25

    def batches(self) -> Iterator[range]:
        """Ranges of indices, each handed out once every index in it is due."""
        schedule, stop, spin, clock = self.schedule, self.stop, self.spin, time.perf_counter
        total, tick = schedule.total, self.tick
        woke = -tick
        with fine_timer_slack():
            while self.fed < total and not stop.is_set():
                if tick:
                    wait_until(woke + tick, stop, spin)
                now = woke = clock()
                due = schedule.due_count(now)
                if due > self.fed:
                    lag = now - schedule.due(self.fed)
                    self.max_lag = max(self.max_lag, lag)
                    self.total_lag += lag
                    self.batches_fed += 1
                    batch = range(self.fed, due)
                    self.fed = due
                    yield batch
                else:
                    wait_until(schedule.due(self.fed), stop, spin)

    @property
    def mean_lag(self) -> float:
        """Seconds the oldest item of a batch waited past its due time, on average."""
        return self.total_lag / self.batches_fed if self.batches_fed else 0.0

    def blocking_items(self) -> Iterator[tuple[int, float, float]]:
        """The items, each yielded no earlier than its due time: an ``imap`` input that blocks
        as a Kafka consumer does."""
        make = self.items
        for batch in self.batches():
            yield from map(make, batch)


class Producer:
    """A thread that feeds the pool: ``feed(batch)`` for each batch of :meth:`Pacer.batches`.

    An exception in ``feed`` is kept for :meth:`join`, and ``on_error`` runs at once in the
    thread, so that a consumer waiting for results that will never come is woken up (by
    terminating the pool, or by a sentinel in its queue).
    """

    def __init__(
        self,
        pacer: Pacer,
        feed: Callable[[range], None],
        on_error: Callable[[], None],
        name: str = "bench-producer",
    ) -> None:
        self.pacer = pacer
        self.error: BaseException | None = None  # what feed() raised
        self._feed = feed
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            for batch in self.pacer.batches():
                self._feed(batch)
        except BaseException as exc:
            self.error = exc
            self._on_error()

    def drive(self, consume: Callable[[], None], abort: Callable[[], None]) -> None:
        """Start the thread, run ``consume`` here, then join.

        When ``consume`` raises, the feed is stopped and ``abort`` runs (it must unblock a
        producer stuck in a full pool) before the exception goes on; when the producer failed,
        its exception is raised instead (the consumer's error is then only a consequence).
        """
        self._thread.start()
        try:
            consume()
        except BaseException:
            # Read before abort(), whose effect on the producer is an error of its own.
            producer_failed = self.error is not None
            self.pacer.stop.set()
            abort()
            self._thread.join()
            if producer_failed and self.error is not None:
                raise self.error from None
            raise
        self._thread.join()
        if self.error is not None:
            raise self.error


class Recorder:
    """The consumer's record: when each item's result arrived, checked to come in input order.

    Args:
        total: items in the run.
        engine: the engine's label, for the error message.

    Example:
        >>> rec = Recorder(2, "demo")
        >>> rec.receive(0); rec.receive(1); rec.finish()
        >>> rec.count
        2
    """

    def __init__(self, total: int, engine: str) -> None:
        self.total = total
        self.engine = engine
        self.received = array("d", bytes(8 * total))  # perf_counter() per index: [12.3, ...]
        self.count = 0  # results received so far, in order: 120_000

    def receive(self, index: Any) -> None:
        """The result of item ``index`` arrived now.

        Raises:
            StreamCheckError: it is not the next index (lost, duplicated or reordered), or
                there are more results than items.
        """
        count = self.count
        if count >= self.total:
            raise StreamCheckError(
                f"{self.engine}: more results than the {self.total:,} items due (one more "
                f"for item {index!r})"
            )
        if index != count:
            raise StreamCheckError(
                f"{self.engine}: got the result of item {index!r} where item {count} was "
                f"expected ({self.total:,} items due): a result was lost, duplicated or "
                "reordered"
            )
        self.received[count] = time.perf_counter()
        self.count = count + 1

    def finish(self) -> None:
        """The run ended: every item's result must have arrived.

        Raises:
            StreamCheckError: fewer results than items.
        """
        if self.count != self.total:
            raise StreamCheckError(
                f"{self.engine}: {self.count:,} results for {self.total:,} items due: "
                f"item {self.count} and later never came back"
            )
