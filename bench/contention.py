"""The ceiling of any N-worker pool on this machine: N processes running the work at once.

A pool's workers run the workload concurrently; on a machine whose cores slow each other down
(shared caches, memory bandwidth, SMT siblings behind a VM's vCPUs), each message then costs
more CPU than it does alone. No pool can beat N plain processes that do nothing but the work, so

    ceiling speedup vs serial = N * (CPU per message alone) / (CPU per message with N at once)

Usage: ``python bench/contention.py [--workload transform] [--messages 200000] [--processes 2]``,
or with your own data and function, as ``ordpool bench`` takes them:
``python bench/contention.py --input /tmp/tweets.ndjson --fn bench.tweets:project``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool.bench import WORKLOADS, load_callable, make_messages, read_input


def _run(queue: mp.Queue, workload: str, n: int, start: mp.Event, path: str | None) -> None:  # type: ignore[type-arg]
    if path is None:
        fn = WORKLOADS[workload].fn
        messages = make_messages(n)
    else:
        fn = load_callable(workload)
        messages = read_input(path, n)
        n = len(messages)
    for message in messages[:2000]:  # warm up
        fn(message)
    queue.put("ready")
    start.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    for message in messages:
        fn(message)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    queue.put(cpu / n * 1e6)


def measure(workload: str, n: int, processes: int, path: str | None = None) -> list[float]:
    """CPU microseconds per message of each of ``processes`` processes running at once."""
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_run, args=(queue, workload, n, start, path)) for _ in range(processes)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        assert queue.get() == "ready"
    start.set()
    costs = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="transform", choices=sorted(WORKLOADS))
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--input", metavar="FILE", help="messages, one per line (with --fn)")
    parser.add_argument("--fn", metavar="MODULE:FUNCTION", help="the function, with --input")
    args = parser.parse_args(argv)
    if (args.input is None) != (args.fn is None):
        parser.error("--input and --fn go together")
    workload = args.fn or args.workload
    alone, together = [], []
    for _ in range(args.repeat):  # rounds, so that a drift of the machine hits both
        alone.extend(measure(workload, args.messages, 1, args.input))
        together.extend(measure(workload, args.messages, args.processes, args.input))
    a, t = statistics.median(alone), statistics.median(together)
    print(f"workload {workload}, {args.messages:,} messages, medians of {args.repeat} rounds")
    print(f"  1 process alone:            {a:6.2f} us/msg of CPU")
    print(f"  {args.processes} processes at once:       {t:6.2f} us/msg of CPU each")
    print(f"  ceiling for {args.processes} workers: {args.processes * a / t:.2f}x serial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
