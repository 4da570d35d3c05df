"""Ray backend vs. the process pool vs. one process, on the ``transform`` workload, in one run.

    python bench/ray_compare.py [--messages 200000] [--workers 2] [--repeat 3] [--batch-size N]

What it does, in order::

    start Ray (local, num_cpus = --workers, temp dir build/ray, no dashboard)
        -> open both pools (process pool: forkserver; Ray pool: actors), before the data exists
        -> build the messages once (~460-byte JSON, ordpool.bench.make_messages)
        -> per engine: one untimed warm-up pass, then --repeat timed passes
        -> table: throughput, x serial, driver CPU per message, workers' CPU per message

The number that matters here is the **driver's CPU per message**: ``getrusage(RUSAGE_SELF)``
of this process over a timed pass (every thread: the engine's, the collector's, and Ray's own
C++ threads in the driver), divided by the messages. It bounds how far a pool can scale
(PERF.md: ``throughput <= 1 / driver cost per message``); the Ray backend's target is at most
2 us per message at the default batch size. Results are drained with ``deque(maxlen=0)``: the
consumer keeps nothing. Workers' CPU is read with psutil from the worker (actor) processes,
which live on this machine for a local Ray.

Pools are opened before the messages are built (PERF.md, copy-on-write), and the process pool
uses ``forkserver`` for the same reason. Single runs on a shared machine are noisy: compare the
rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import psutil

from ordpool import ProcessOrderedPool
from ordpool.bench import make_messages, transform

_ROOT = Path(__file__).resolve().parents[1]
_SOCKET_ROOM = 70  # Ray's longest socket path below its temp dir; Unix allows 107 bytes


def _driver_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _cpu_of(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _measure(run: Callable[[], None], n: int, repeat: int, pids: list[int]) -> dict[str, float]:
    """Median wall time over ``repeat`` passes; CPU figures of the median pass."""
    run_stats = []
    for _ in range(repeat):
        cpu0, workers0, t0 = _driver_cpu(), _cpu_of(pids), time.perf_counter()
        run()
        wall = time.perf_counter() - t0
        run_stats.append((wall, _driver_cpu() - cpu0, _cpu_of(pids) - workers0))
    wall, driver, workers = sorted(run_stats)[len(run_stats) // 2]
    return {
        "wall": wall,
        "kmsg_s": n / wall / 1e3,
        "driver_us": driver / n * 1e6,
        "workers_us": workers / n * 1e6,
        "spread": (max(s[0] for s in run_stats) - min(s[0] for s in run_stats)) / wall,
    }


def _ray_temp_dir() -> str:
    temp = _ROOT / "build" / "ray"
    if len(str(temp)) + _SOCKET_ROOM > 107:
        temp = Path("/tmp") / f"ordpool-ray-{os.getuid()}"
    temp.mkdir(parents=True, exist_ok=True)
    return str(temp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=460, help="bytes per message")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="fixed batch size (default: adaptive)"
    )
    args = parser.parse_args(argv)

    import ray

    load = os.getloadavg()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, _temp_dir=_ray_temp_dir(), include_dashboard=False)
    ray_init = time.perf_counter() - t0
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        t0 = time.perf_counter()
        ray_pool = ProcessOrderedPool(
            transform, args.workers, batch_size=args.batch_size, backend="ray"
        )
        ray_start = time.perf_counter() - t0
        t0 = time.perf_counter()
        proc_pool = ProcessOrderedPool(
            transform, args.workers, batch_size=args.batch_size, start_method="forkserver"
        )
        proc_start = time.perf_counter() - t0
        with ray_pool, proc_pool:
            messages = make_messages(args.messages, size=args.size)
            n = len(messages)
            size = statistics.mean(map(len, messages[:1000]))
            expected = [transform(m) for m in messages[:1000]]
            for pool in (proc_pool, ray_pool):  # warm-up, and a check
                assert pool.map(messages[:1000]) == expected

            def serial() -> None:
                collections.deque(map(transform, messages), maxlen=0)

            rows.append(("serial", _measure(serial, n, args.repeat, [])))
            for name, pool in (("process pool", proc_pool), ("ray", ray_pool)):
                pids = pool.worker_pids()

                def run(pool: ProcessOrderedPool = pool) -> None:
                    collections.deque(pool.imap(messages), maxlen=0)

                rows.append((name, _measure(run, n, args.repeat, pids)))
            driver_rss = psutil.Process().memory_info().rss / 2**20
            batch = ray_pool.stats().batch_size
    finally:
        ray.shutdown()

    base = rows[0][1]["kmsg_s"]
    print(
        f"transform, {n} messages of ~{size:.0f} B, {args.workers} workers, "
        f"{psutil.cpu_count()} cores, load average before start {load[0]:.2f}, "
        f"batch size {args.batch_size or f'adaptive (ray settled at {batch})'}, "
        f"median of {args.repeat}"
    )
    print(
        f"startup: ray.init {ray_init:.2f} s, ray pool {ray_start:.2f} s, "
        f"process pool {proc_start:.2f} s; driver RSS at the end {driver_rss:.0f} MiB"
    )
    print()
    print("| engine | k msg/s | x serial | driver CPU us/msg | workers CPU us/msg | spread |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        workers = f"{r['workers_us']:.1f}" if name != "serial" else "-"
        print(
            f"| {name} | {r['kmsg_s']:.0f} | {r['kmsg_s'] / base:.2f} | {r['driver_us']:.2f} "
            f"| {workers} | {r['spread']:.0%} |"
        )
    ray_driver = rows[-1][1]["driver_us"]
    verdict = "meets" if ray_driver <= 2.0 else "misses"
    print(f"\nray driver CPU {ray_driver:.2f} us/msg: {verdict} the 2 us/msg target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
