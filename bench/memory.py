"""Bounded memory: 10,000,000 messages through ``imap`` with a slow consumer.

The input is a generator (nothing is built up front) and the function is cheap (``zlib.crc32``
of a 100-byte message), so the workers outrun the consumer, which sleeps a little after every
1,000 results. A pool that reads its input eagerly, or keeps results the consumer has not
taken, grows without bound here; ordpool stops reading its input while its window is full.
A thread samples the RSS of the parent and of the workers every 50 ms.

Target: the parent's peak RSS within 100 MB of its RSS at the start (exit status 1 otherwise).

Usage, from the repository root::

    python bench/memory.py                     # 10M messages, ordpool, about 15 s on 2 cores
    python bench/memory.py --messages 200000   # quick
    python bench/memory.py --engine pool -n 2000000   # multiprocessing.Pool.imap, to compare
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

import psutil

from ordpool import ProcessOrderedPool
from ordpool.bench import descendants, usable_cores

TARGET_MB = 100.0


def messages(n: int, size: int) -> Iterator[bytes]:
    """``n`` distinct messages of ``size`` bytes, made one at a time."""
    pad = b"x" * max(0, size - 10)
    for i in range(n):
        yield b"%010d" % i + pad


class Sampler(threading.Thread):
    """Samples the RSS of this process and of ``pids`` every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.me = psutil.Process()
        self.workers = [psutil.Process(pid) for pid in pids]
        self.interval = interval
        self.stopped = threading.Event()
        self.start_parent = self.me.memory_info().rss
        self.start_workers = self._workers_rss()
        self.peak_parent = self.start_parent
        self.peak_workers = self.start_workers

    def _workers_rss(self) -> int:
        total = 0
        for p in self.workers:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        """One sample now."""
        self.peak_parent = max(self.peak_parent, self.me.memory_info().rss)
        self.peak_workers = max(self.peak_workers, self._workers_rss())

    def stop(self) -> None:
        """Stop sampling (after a last sample)."""
        self.stopped.set()
        self.join()
        self.sample()


def consume(results: Iterator[Any], n: int, delay: float, progress: bool) -> int:
    """Take the results 1,000 at a time, sleeping ``delay`` seconds after each thousand."""
    done = 0
    last = time.monotonic()
    while True:
        chunk = list(itertools.islice(results, 1000))
        if not chunk:
            break
        done += len(chunk)
        if delay:
            time.sleep(delay)
        if progress and time.monotonic() - last > 0.5:
            last = time.monotonic()
            rss = psutil.Process().memory_info().rss / 1e6
            sys.stderr.write(f"\r{done:,}/{n:,} results, parent RSS {rss:,.0f} MB   ")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\r" + " " * 60 + "\r")
    return done


def main(argv: list[str] | None = None) -> int:
    """Run the test; print start RSS, peak RSS and growth; 0 when within the target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", "-n", type=int, default=10_000_000)
    parser.add_argument("--message-size", type=int, default=100, metavar="BYTES")
    parser.add_argument("--workers", type=int, default=None, help="default: usable cores")
    parser.add_argument(
        "--consumer-delay",
        type=float,
        default=0.001,
        metavar="SECONDS",
        help="the consumer sleeps this long after every 1,000 results (default: 0.001)",
    )
    parser.add_argument(
        "--engine",
        choices=("ordpool", "pool"),
        default="ordpool",
        help="pool: multiprocessing.Pool.imap, for contrast (it reads its input eagerly)",
    )
    parser.add_argument(
        "--start-method", choices=("forkserver", "spawn", "fork"), default="forkserver"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    workers = args.workers or usable_cores()
    progress = sys.stderr.isatty()
    stdlib_pool = None
    if args.engine == "ordpool":
        pool = ProcessOrderedPool(zlib.crc32, workers, start_method=args.start_method)
        pids = pool.worker_pids()
        results = pool.imap(messages(args.messages, args.message_size))
    else:
        ctx = multiprocessing.get_context(args.start_method)
        before = descendants()
        stdlib_pool = ctx.Pool(workers)
        pids = sorted(descendants() - before)
        results = stdlib_pool.imap(
            zlib.crc32, messages(args.messages, args.message_size), chunksize=1000
        )
    sampler = Sampler(pids)
    sampler.start()
    start = time.perf_counter()
    try:
        done = consume(results, args.messages, args.consumer_delay, progress)
    finally:
        sampler.stop()
        if stdlib_pool is not None:
            stdlib_pool.terminate()
            stdlib_pool.join()
        else:
            pool.close()
            pool.join()
    wall = time.perf_counter() - start
    growth = (sampler.peak_parent - sampler.start_parent) / 1e6
    ok = growth <= TARGET_MB and done == args.messages
    report = {
        "engine": args.engine,
        "messages": done,
        "message_size": args.message_size,
        "workers": workers,
        "consumer_delay_s_per_1000": args.consumer_delay,
        "wall_s": wall,
        "msgs_per_s": done / wall,
        "start_rss_mb": sampler.start_parent / 1e6,
        "peak_rss_mb": sampler.peak_parent / 1e6,
        "growth_mb": growth,
        "workers_start_rss_mb": sampler.start_workers / 1e6,
        "workers_peak_rss_mb": sampler.peak_workers / 1e6,
        "target_growth_mb": TARGET_MB,
        "ok": ok,
    }
    print(
        f"{args.engine}: {done:,} messages of {args.message_size} B, {workers} workers, "
        f"slow consumer ({args.consumer_delay * 1e3:g} ms per 1,000 results)"
    )
    print(f"  time            {wall:8.1f} s   ({done / wall / 1e3:,.0f}k msg/s)")
    print(
        f"  parent RSS      start {report['start_rss_mb']:8.1f} MB   "
        f"peak {report['peak_rss_mb']:8.1f} MB"
    )
    print(f"  growth          {growth:8.1f} MB   (target: within {TARGET_MB:g} MB)")
    print(
        f"  workers RSS     start {report['workers_start_rss_mb']:8.1f} MB   "
        f"peak {report['workers_peak_rss_mb']:8.1f} MB (all workers)"
    )
    print("  verdict         " + ("OK" if ok else "FAILED: memory grew beyond the target"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
