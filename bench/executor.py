"""``OrderedProcessPoolExecutor`` against ``ProcessPoolExecutor``: map throughput, submit latency.

One run, one machine, the same messages and function for everyone (``ordpool.bench.transform``:
stdlib ``json.loads`` of a ~460-byte message, validation and a few computed fields into a
5-tuple, about 8 us of work), both executors with the same start method (``forkserver`` by
default: workers started from a clean process, so the parent's data pages are not shared with
them; see PERF.md) and the same number of workers:

* ``map`` with default arguments, ours vs the stdlib's (chunksize 1: one future per message;
  it gets fewer messages, ``--stdlib-default-messages``, and is compared in msg/s);
* the stdlib's ``map`` at its best chunksize (each of ``--chunksizes`` is timed, the fastest
  median wins);
* ``submit(fn, msg).result()`` round trips, one at a time after a warm-up: median and p99.

Throughput rows are medians of ``--repeat`` runs, taken in rounds (one run of each engine per
round, so that a load that comes and goes hits all alike); parent CPU is ``getrusage(RUSAGE_SELF)``
(every thread of this process) per message: the number that caps how far a pool scales.
Results are drained with ``deque(maxlen=0)``: nothing is kept.

Usage, from the repository root::

    .venv/bin/python bench/executor.py                      # 200k messages, 2 workers
    .venv/bin/python bench/executor.py --messages 50000 --repeat 1   # quick look
    .venv/bin/python bench/executor.py --json /tmp/executor.json

Targets (the issue): ours >= 10x the stdlib's default ``map``, >= 1.1x the stdlib's ``map`` at
its best chunksize, and a ``submit`` round trip no slower than the stdlib's.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import functools
import json
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

from ordpool import OrderedProcessPoolExecutor
from ordpool.bench import make_messages, transform


def _parent_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def timed(run: Callable[[], Iterator[Any]], n: int) -> tuple[float, float]:
    """``(wall seconds, parent CPU us per message)`` of draining ``run()``."""
    cpu0, t0 = _parent_cpu(), time.perf_counter()
    collections.deque(run(), maxlen=0)
    wall = time.perf_counter() - t0
    return wall, (_parent_cpu() - cpu0) / n * 1e6


def interleaved(
    runs: dict[str, tuple[Callable[[], Iterator[Any]], int]], repeat: int
) -> dict[str, dict[str, Any]]:
    """Each named ``(run, messages)`` ``repeat`` times, one round of all at a time (so a load
    that comes and goes on a shared machine hits each of them alike): medians, msg/s."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, (run, n) in runs.items():
            samples[name].append(timed(run, n))
    return {name: summary(samples[name], runs[name][1]) for name in runs}


def summary(samples: list[tuple[float, float]], n: int) -> dict[str, Any]:
    """Median wall time and parent CPU of ``(wall, cpu)`` samples, with msg/s."""
    walls = [wall for wall, _ in samples]
    cpus = [cpu for _, cpu in samples]
    wall = statistics.median(walls)
    return {
        "messages": n,
        "wall_s": wall,
        "msgs_per_s": n / wall,
        "parent_cpu_us_per_msg": statistics.median(cpus),
        "runs_wall_s": walls,
    }


def round_trips(
    executors: dict[str, cf.Executor], message: bytes, calls: int
) -> dict[str, dict[str, float]]:
    """Median and p99 of ``submit(transform, message).result()``, one call at a time, in us;
    the executors take turns by blocks of 10 calls."""
    for executor in executors.values():  # warm: workers up, caches and sizes settled
        for _ in range(max(20, calls // 10)):
            executor.submit(transform, message).result()
    times: dict[str, list[float]] = {name: [] for name in executors}
    for _ in range(0, calls, 10):
        for name, executor in executors.items():
            for _ in range(10):
                t0 = time.perf_counter()
                executor.submit(transform, message).result()
                times[name].append(time.perf_counter() - t0)
    report = {}
    for name, samples in times.items():
        samples.sort()
        report[name] = {
            "calls": len(samples),
            "median_us": statistics.median(samples) * 1e6,
            "p99_us": samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1e6,
        }
    return report


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = multiprocessing.get_context(args.start_method)
    multiprocessing.resource_tracker.ensure_running()
    if args.start_method == "forkserver":
        multiprocessing.forkserver.ensure_running()
    # Executors first, data second (PERF.md: with fork, workers would share the data's pages).
    ours = OrderedProcessPoolExecutor(args.workers, mp_context=ctx)
    theirs = cf.ProcessPoolExecutor(args.workers, mp_context=ctx)
    try:
        warm = make_messages(2000, size=args.message_size, seed=1)
        collections.deque(ours.map(transform, warm), maxlen=0)
        collections.deque(theirs.map(transform, warm, chunksize=100), maxlen=0)
        messages = make_messages(args.messages, size=args.message_size)
        few = messages[: args.stdlib_default_messages]
        report: dict[str, Any] = {
            "machine": {
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "usable_cores": len(os.sched_getaffinity(0)),
                "loadavg_at_start": os.getloadavg(),
            },
            "config": {
                "workload": "transform",
                "messages": len(messages),
                "avg_message_bytes": sum(map(len, messages)) / len(messages),
                "stdlib_default_messages": len(few),
                "workers": args.workers,
                "start_method": args.start_method,
                "repeat": args.repeat,
                "chunksizes": args.chunksizes,
            },
        }
        n = len(messages)
        report["serial"] = interleaved({"serial": (lambda: map(transform, messages), n)}, 1)[
            "serial"
        ]
        runs: dict[str, tuple[Callable[[], Iterator[Any]], int]] = {
            "ours_default": (lambda: ours.map(transform, messages), n),
            "stdlib_default": (lambda: theirs.map(transform, few), len(few)),
        }
        for size in args.chunksizes:
            runs[f"stdlib_{size}"] = (
                functools.partial(theirs.map, transform, messages, chunksize=size),
                n,
            )
        results = interleaved(runs, args.repeat)
        report["ours_default"] = results["ours_default"]
        report["stdlib_default"] = results["stdlib_default"]
        sweep = {size: results[f"stdlib_{size}"] for size in args.chunksizes}
        best = min(sweep, key=lambda size: sweep[size]["wall_s"])
        report["stdlib_best"] = {**sweep[best], "chunksize": best}
        report["stdlib_sweep"] = {str(k): v["msgs_per_s"] for k, v in sweep.items()}
        trips = round_trips({"ours": ours, "stdlib": theirs}, messages[0], args.calls)
        report["ours_submit"] = trips["ours"]
        report["stdlib_submit"] = trips["stdlib"]
    finally:
        ours.shutdown()
        theirs.shutdown()
    report["ratios"] = {
        "vs_stdlib_default": report["ours_default"]["msgs_per_s"]
        / report["stdlib_default"]["msgs_per_s"],
        "vs_stdlib_best": report["ours_default"]["msgs_per_s"]
        / report["stdlib_best"]["msgs_per_s"],
        "submit_median_stdlib_over_ours": report["stdlib_submit"]["median_us"]
        / report["ours_submit"]["median_us"],
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    c = report["config"]
    ours = report["ours_default"]["msgs_per_s"]
    serial = report["serial"]["msgs_per_s"]
    lines = [
        f"transform, {c['messages']:,} messages of ~{c['avg_message_bytes']:.0f} B, "
        f"{c['workers']} workers, {c['start_method']}, median of {c['repeat']} "
        f"(Python {report['machine']['python']}, load at start "
        f"{report['machine']['loadavg_at_start'][0]:.2f})",
        "",
        f"{'map':<44}{'messages':>10}{'k msg/s':>10}{'x serial':>10}{'ours / it':>11}"
        f"{'parent us/msg':>15}",
    ]
    rows: Sequence[tuple[str, dict[str, Any]]] = [
        ("serial (one process)", report["serial"]),
        ("OrderedProcessPoolExecutor.map (defaults)", report["ours_default"]),
        ("ProcessPoolExecutor.map (defaults)", report["stdlib_default"]),
        (
            f"ProcessPoolExecutor.map (chunksize={report['stdlib_best']['chunksize']}, best)",
            report["stdlib_best"],
        ),
    ]
    for label, row in rows:
        rate = row["msgs_per_s"]
        lines.append(
            f"{label:<44}{row['messages']:>10,}{rate / 1e3:>10.1f}{rate / serial:>10.2f}"
            f"{ours / rate:>10.2f}x{row['parent_cpu_us_per_msg']:>15.2f}"
        )
    sweep = ", ".join(f"{k}: {v / 1e3:.1f}k" for k, v in report["stdlib_sweep"].items())
    lines += [
        f"  (stdlib chunksize sweep, msg/s: {sweep})",
        "",
        f"{'submit(...).result() round trip':<44}{'calls':>10}{'median us':>12}{'p99 us':>10}",
    ]
    for label, key in (
        ("OrderedProcessPoolExecutor", "ours_submit"),
        ("ProcessPoolExecutor", "stdlib_submit"),
    ):
        row = report[key]
        lines.append(
            f"{label:<44}{row['calls']:>10}{row['median_us']:>12.0f}{row['p99_us']:>10.0f}"
        )
    r = report["ratios"]
    lines += [
        "",
        f"targets: map vs stdlib default {r['vs_stdlib_default']:.1f}x (>= 10), "
        f"vs stdlib best {r['vs_stdlib_best']:.2f}x (>= 1.1), "
        f"submit median stdlib/ours {r['submit_median_stdlib_over_ours']:.2f} (>= 1.0)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument(
        "--stdlib-default-messages",
        type=int,
        default=20_000,
        help="messages for the stdlib's default map, which is slow (default 20,000)",
    )
    parser.add_argument("--message-size", type=int, default=460)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300, help="submit round trips to time")
    parser.add_argument(
        "--chunksizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[100, 1000, 5000],
        help="the stdlib map's chunksizes to sweep (default 100,1000,5000)",
    )
    parser.add_argument(
        "--start-method", default="forkserver", choices=["forkserver", "spawn", "fork"]
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    report = run(args)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
