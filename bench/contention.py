"""The ceiling of any N-worker pool on this machine: N processes running the work at once.

A pool's workers run the workload concurrently; on a machine whose cores slow each other down
(shared caches, memory bandwidth, SMT siblings behind a VM's vCPUs), each message then costs
more CPU than it does alone. No pool can beat N plain processes that do nothing but the work, so

    ceiling speedup vs serial = N * (CPU per message alone) / (CPU per message with N at once)

Usage: ``python bench/contention.py [--workload transform] [--messages 200000] [--processes 2]``
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool._bench import WORKLOADS, make_messages


def _run(queue: mp.Queue, workload: str, n: int, start: mp.Event) -> None:  # type: ignore[type-arg]
    fn = WORKLOADS[workload].fn
    messages = make_messages(n)
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


def measure(workload: str, n: int, processes: int) -> list[float]:
    """CPU microseconds per message of each of ``processes`` processes running at once."""
    ctx = mp.get_context("spawn")
    queue, start = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_run, args=(queue, workload, n, start)) for _ in range(processes)]
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
    args = parser.parse_args(argv)
    alone, together = [], []
    for _ in range(args.repeat):  # rounds, so that a drift of the machine hits both
        alone.extend(measure(args.workload, args.messages, 1))
        together.extend(measure(args.workload, args.messages, args.processes))
    a, t = statistics.median(alone), statistics.median(together)
    print(f"workload {args.workload}, {args.messages:,} messages, medians of {args.repeat} rounds")
    print(f"  1 process alone:            {a:6.2f} us/msg of CPU")
    print(f"  {args.processes} processes at once:       {t:6.2f} us/msg of CPU each")
    print(f"  ceiling for {args.processes} workers: {args.processes * a / t:.2f}x serial")
    return 0


if __name__ == "__main__":
    sys.exit(main())
