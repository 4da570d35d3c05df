"""A/B: this checkout's ordpool against an earlier commit's, in one process, runs interleaved.

On a VM whose speed moves 5 to 15% from minute to minute, two benchmark runs minutes apart can
not show a change of a few percent. Here both versions run side by side: the earlier commit's
``ordpool/`` is exported (``git archive``) as a package named ``ordpool_old``, one pool of each
is started (``forkserver``, before the data exists), and the runs alternate, in pairs, the
order flipped every round. The report gives the medians of each version's throughput and
parent CPU per message, and the difference within each pair.

``--engine executor`` compares ``OrderedProcessPoolExecutor.map`` instead of the pool's ``imap``.

Usage: ``python bench/ab.py --against REV [--engine pool|executor]
[--workload transform|decode] [--rounds 10]
[--messages 200000] [--input FILE --fn module:function] [--new-option batch_size=2730]
[--old-option ...]``
"""

from __future__ import annotations

import argparse
import collections
import importlib
import multiprocessing
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ordpool import OrderedProcessPoolExecutor, ProcessOrderedPool
from ordpool.bench import WORKLOADS, load_callable, make_messages, read_input

ROOT = Path(__file__).resolve().parents[1]


def export_old(rev: str, into: Path) -> None:
    """``ordpool/`` of commit ``rev``, as the package ``ordpool_old`` under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "ordpool"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    shutil.move(str(into / "ordpool"), str(into / "ordpool_old"))


def _options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        options[name] = int(value) if value.lstrip("-").isdigit() else value
    return options


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _make(args: argparse.Namespace, fn: Any, old_module: Any) -> dict[str, Any]:
    """One pool (or executor) of each version, ``forkserver``."""
    if args.engine == "executor":
        ctx = multiprocessing.get_context("forkserver")
        return {
            "old": old_module.OrderedProcessPoolExecutor(args.workers, mp_context=ctx),
            "new": OrderedProcessPoolExecutor(args.workers, mp_context=ctx),
        }
    return {
        "old": old_module.ProcessOrderedPool(
            fn, workers=args.workers, start_method="forkserver", **_options(args.old_option)
        ),
        "new": ProcessOrderedPool(
            fn, workers=args.workers, start_method="forkserver", **_options(args.new_option)
        ),
    }


def _run(pool: Any, fn: Any, messages: list[Any]) -> Any:
    if hasattr(pool, "imap"):
        return pool.imap(messages)
    return pool.map(fn, messages)


def _stop(pool: Any) -> None:
    if hasattr(pool, "imap"):
        pool.close()
        pool.join()
    else:
        pool.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier commit (any git rev)")
    parser.add_argument("--engine", default="pool", choices=["pool", "executor"])
    parser.add_argument("--workload", default="transform", choices=sorted(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--input", help="messages from this file instead (one per line)")
    parser.add_argument("--fn", help="module:function to run instead of the workload's")
    parser.add_argument("--new-option", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--old-option", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    fn = load_callable(args.fn) if args.fn else WORKLOADS[args.workload].fn
    what = args.fn or args.workload
    with tempfile.TemporaryDirectory(prefix="ordpool-ab-") as tmp:
        export_old(args.against, Path(tmp))
        sys.path.insert(0, tmp)
        old_module = importlib.import_module("ordpool_old")
        pools = _make(args, fn, old_module)
        try:
            if args.input:
                messages = read_input(args.input, args.messages)
            else:
                messages = make_messages(args.messages)
            expected = list(map(fn, messages[:2000]))
            for pool in pools.values():
                assert list(_run(pool, fn, messages[:2000])) == expected
            runs: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
            for i in range(args.rounds):
                order = ["old", "new"] if i % 2 == 0 else ["new", "old"]
                for name in order:
                    cpu, start = _cpu(), time.perf_counter()
                    collections.deque(_run(pools[name], fn, messages), maxlen=0)
                    wall, cpu = time.perf_counter() - start, _cpu() - cpu
                    runs[name].append((len(messages) / wall, cpu / len(messages) * 1e6))
        finally:
            for pool in pools.values():
                _stop(pool)
    print(
        f"{what}, {args.engine}, {args.workers} workers, {args.messages:,} messages, {args.rounds} "
        f"pairs of runs; old = {args.against}"
    )
    for name, values in runs.items():
        rate = statistics.median(v[0] for v in values)
        parent = statistics.median(v[1] for v in values)
        print(f"  {name}: {rate / 1e3:7.1f}k msg/s   parent {parent:.3f} us/msg")
    diffs = sorted(n[1] - o[1] for o, n in zip(runs["old"], runs["new"]))
    lower = sum(d < 0 for d in diffs)
    print(
        f"  new - old parent, per pair: median {statistics.median(diffs):+.3f} us "
        f"({lower} of {len(diffs)} pairs lower; {diffs[0]:+.2f} to {diffs[-1]:+.2f})"
    )
    ratios = [n[0] / o[0] for o, n in zip(runs["old"], runs["new"])]
    print(f"  new / old throughput, per pair: median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
