"""What a timed run measures: wall time, CPU of the parent and of the workers, peak RSS.

* the parent's CPU from ``getrusage(RUSAGE_SELF)`` (every parent thread);
* the workers' CPU from ``psutil`` (``cpu_times`` of each worker process);
* the CPU every other process took meanwhile on the usable cores (the machine's noise);
* peak RSS of parent + workers: the sum of each process's own peak, which Linux keeps
  (``VmHWM``, reset before each run), so that nothing runs in the parent during a timed run
  but the engine; elsewhere, sampled every 50 ms by a background thread.
"""

from __future__ import annotations

import collections
import gc
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import psutil

__all__ = [
    "PeakRss",
    "RssSampler",
    "RunStats",
    "descendants",
    "parent_cpu_seconds",
    "processes_cpu_seconds",
    "start_helpers",
    "timed_run",
]

_SAMPLE_INTERVAL = 0.05  # seconds between RSS samples

# -- processes -----------------------------------------------------------------------------------

_HELPER_MARKERS = (
    "multiprocessing.forkserver import",
    "multiprocessing.resource_tracker import",
    "loky.backend.resource_tracker",  # joblib's
)


def descendants() -> set[int]:
    """Pids of this process's descendants, without multiprocessing's helper processes.

    Workers started by the forkserver are its children (our grandchildren): they count, the
    forkserver itself and the resource tracker do not.
    """
    me = psutil.Process()
    helpers = set()
    for child in me.children():
        try:
            cmdline = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if any(marker in cmdline for marker in _HELPER_MARKERS):
            helpers.add(child.pid)
    return {p.pid for p in me.children(recursive=True)} - helpers


def start_helpers(start_method: str) -> None:
    """Start the resource tracker (and the forkserver) now, so they are not mistaken for workers.

    Also keeps their start out of the first pool's start-up.
    """
    multiprocessing.resource_tracker.ensure_running()
    if start_method == "forkserver":
        multiprocessing.forkserver.ensure_running()


def processes_cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds used so far by ``procs`` (gone processes count 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _busy_seconds() -> float:
    """CPU seconds spent so far, by anyone, on the cores this process may use."""
    try:
        cpus = psutil.Process().cpu_affinity() or []
    except (AttributeError, psutil.Error):
        cpus = []
    per_cpu = psutil.cpu_times(percpu=True)
    busy = 0.0
    for i, t in enumerate(per_cpu):
        if cpus and i not in cpus:
            continue
        busy += sum(t) - t.idle - getattr(t, "iowait", 0.0)
    return float(busy)


def parent_cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# -- memory --------------------------------------------------------------------------------------


class RssSampler:
    """Background thread: peak RSS of the parent and of the workers, sampled every 50 ms."""

    def __init__(self, workers: Sequence[psutil.Process]) -> None:
        self._me = psutil.Process()
        self._workers = list(workers)
        self._stop = threading.Event()
        self.peak_total = 0  # bytes, parent + workers: 412_000_000
        self.peak_parent = 0  # bytes: 180_000_000
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def sample(self) -> None:
        """Take one sample now."""
        parent = self._me.memory_info().rss
        total = parent
        for p in self._workers:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak_parent = max(self.peak_parent, parent)
        self.peak_total = max(self.peak_total, total)

    def _run(self) -> None:
        while not self._stop.wait(_SAMPLE_INTERVAL):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakRss:
    """Peak RSS of the parent and of the workers over a timed run, measured without running
    anything during it where Linux allows.

    There, the kernel keeps each process's high-water mark (``VmHWM`` in ``/proc/PID/status``),
    and writing ``5`` to ``/proc/PID/clear_refs`` resets it: reset before the run, read after.
    A sampling thread would take the GIL 20 times a second in the very process it measures,
    and each time force a switch away from a consumer holding it: on ``decode`` it cost
    ordpool's multi-threaded parent about 5% of its throughput (medians of 5 runs, 416k
    against 396k msg/s). ``peak_total`` is then the sum of each process's own peak, which
    bounds their simultaneous peak from above. Elsewhere (no ``/proc``, or no right to write
    there), :class:`RssSampler` samples every 50 ms.
    """

    def __init__(self, workers: Sequence[psutil.Process]) -> None:
        self._pids = [os.getpid(), *(p.pid for p in workers)]
        self._sampler: RssSampler | None = None
        self._workers = workers
        self.peak_total = 0  # bytes, parent + workers: 412_000_000
        self.peak_parent = 0  # bytes: 180_000_000

    def __enter__(self) -> PeakRss:
        try:
            for pid in self._pids:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            if _hwm(self._pids[0]) is None:
                raise OSError("no VmHWM")
        except OSError:
            self._sampler = RssSampler(self._workers).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.__exit__(*exc)
            self.peak_total, self.peak_parent = self._sampler.peak_total, self._sampler.peak_parent
            return
        peaks = [_hwm(pid) for pid in self._pids]
        self.peak_parent = peaks[0] or 0
        self.peak_total = sum(p for p in peaks if p is not None)  # a gone worker counts 0


def _hwm(pid: int) -> int | None:
    """The peak RSS of process ``pid`` in bytes (``VmHWM``), or ``None`` if unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- one timed run -------------------------------------------------------------------------------


class Runnable(Protocol):
    """What :func:`timed_run` needs of an engine."""

    def worker_pids(self) -> list[int]: ...

    def imap(self, messages: Sequence[Any]) -> Iterator[Any]: ...


@dataclass
class RunStats:
    """One timed run of one engine.

    Attributes:
        wall_s: seconds from the first message in to the last result out.
        parent_cpu_s: user + system CPU of the parent process (all threads).
        worker_cpu_s: user + system CPU of the worker processes (``None`` for serial).
        peak_rss_bytes: peak RSS of parent + workers (see :class:`PeakRss`).
        peak_parent_rss_bytes: peak RSS of the parent alone.
        other_cpu_s: CPU used meanwhile on the usable cores by every other process (the
            machine's noise: other jobs take cores from the workers).
    """

    wall_s: float
    parent_cpu_s: float
    worker_cpu_s: float | None
    peak_rss_bytes: int
    peak_parent_rss_bytes: int
    other_cpu_s: float = 0.0


def _processes(pids: Sequence[int]) -> list[psutil.Process]:
    """``psutil.Process`` of each pid still alive (a crashed worker's replacement is left out)."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return procs


def timed_run(engine: Runnable, messages: Sequence[Any]) -> RunStats:
    """Run ``engine`` over ``messages`` once; results are drained, never kept."""
    workers = _processes(engine.worker_pids())
    gc.collect()
    with PeakRss(workers) as rss:
        busy0 = _busy_seconds()
        worker_cpu0 = processes_cpu_seconds(workers)
        cpu0 = parent_cpu_seconds()
        t0 = time.perf_counter()
        collections.deque(engine.imap(messages), maxlen=0)
        wall = time.perf_counter() - t0
        cpu = parent_cpu_seconds() - cpu0
        worker_cpu = processes_cpu_seconds(workers) - worker_cpu0
        busy = _busy_seconds() - busy0
    return RunStats(
        wall_s=wall,
        parent_cpu_s=cpu,
        worker_cpu_s=worker_cpu if workers else None,
        peak_rss_bytes=rss.peak_total,
        peak_parent_rss_bytes=rss.peak_parent,
        other_cpu_s=max(0.0, busy - cpu - worker_cpu),
    )
