"""Scaling: ordpool against the best stdlib pool, worker count by worker count.

For each worker count (default 1 to the usable cores) it runs ``ordpool bench``'s comparison on
the same messages (default: the ``transform`` workload) and keeps, per count, ordpool and the
faster of ``multiprocessing.Pool.imap`` and ``ProcessPoolExecutor.map``, each at its best
chunksize. Serial is measured once. The table shows throughput, speedup over serial, the
parent's CPU per message (what caps the scaling: ``1 / parent cost``) and ordpool's ratio to the
best stdlib pool.

Usage, from the repository root::

    python bench/scaling.py                        # 1..usable cores, 100k messages
    python bench/scaling.py --workers 1-4 --messages 200000 --json /tmp/scaling.json
    python bench/scaling.py --workload decode --check
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from ordpool.bench import (
    WORKLOADS,
    BenchConfig,
    BenchError,
    format_report,
    parse_int_list,
    run_benchmark,
    usable_cores,
    write_json,
)


def scaling_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per worker count: ordpool, the best stdlib engine, and their ratio."""
    rows = []
    for group in report["groups"]:
        by_key = {e["engine"]: e for e in group["engines"]}
        o = by_key["ordpool"]
        s = max(
            (by_key[k] for k in ("pool", "executor") if k in by_key),
            key=lambda e: e["msgs_per_s"],
        )
        rows.append(
            {
                "workers": group["workers"],
                "serial_msgs_per_s": by_key["serial"]["msgs_per_s"],
                "ordpool_msgs_per_s": o["msgs_per_s"],
                "ordpool_speedup": o["speedup"],
                "ordpool_parent_cpu_us_per_msg": o["parent_cpu_us_per_msg"],
                "ordpool_verdict": o["verdict"],
                "stdlib_engine": s["engine"],
                "stdlib_label": s["label"],
                "stdlib_msgs_per_s": s["msgs_per_s"],
                "stdlib_speedup": s["speedup"],
                "stdlib_parent_cpu_us_per_msg": s["parent_cpu_us_per_msg"],
                "stdlib_verdict": s["verdict"],
                "ordpool_over_stdlib": o["msgs_per_s"] / s["msgs_per_s"],
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The scaling table."""
    head = (
        f"{'workers':>7}  {'ordpool k/s':>11}  {'x serial':>8}  {'parent us':>9}  "
        f"{'best stdlib':<36}  {'k/s':>7}  {'x serial':>8}  {'parent us':>9}  "
        f"{'ordpool/stdlib':>14}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workers']:>7}  {r['ordpool_msgs_per_s'] / 1e3:>11,.1f}  "
            f"{r['ordpool_speedup']:>8.2f}  {r['ordpool_parent_cpu_us_per_msg']:>9.2f}  "
            f"{r['stdlib_label']:<36}  {r['stdlib_msgs_per_s'] / 1e3:>7,.1f}  "
            f"{r['stdlib_speedup']:>8.2f}  {r['stdlib_parent_cpu_us_per_msg']:>9.2f}  "
            f"{r['ordpool_over_stdlib']:>14.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table (and the full report with ``--verbose``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="transform")
    parser.add_argument(
        "--workers",
        type=parse_int_list,
        default=None,
        metavar="N[,N...]",
        help="worker counts: 1,2,4 or 1-4 (default: 1 to the usable cores, at least 2)",
    )
    parser.add_argument("--messages", "-n", type=int, default=100_000)
    parser.add_argument("--message-size", type=int, default=600, metavar="BYTES")
    parser.add_argument("--repeat", "-r", type=int, default=3)
    parser.add_argument(
        "--start-method", choices=("forkserver", "spawn", "fork"), default="forkserver"
    )
    parser.add_argument("--check", action="store_true", help="verify results against serial")
    parser.add_argument("--json", metavar="FILE", help="write rows + the full report as JSON")
    parser.add_argument("--verbose", "-v", action="store_true", help="also print every table")
    args = parser.parse_args(argv)
    workers = args.workers or list(range(1, max(2, usable_cores()) + 1))
    config = BenchConfig(
        workload=WORKLOADS[args.workload],
        workers=workers,
        messages=args.messages,
        message_size=args.message_size,
        repeat=args.repeat,
        start_method=args.start_method,
        check=args.check,
        command_line=shlex.join(["bench/scaling.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    try:
        report = run_benchmark(config)
    except BenchError as exc:
        print(f"scaling.py: error: {exc}", file=sys.stderr)
        return 2
    rows = scaling_rows(report)
    if args.verbose:
        print(format_report(report))
        print()
    cfg = report["config"]
    print(
        f"scaling: {cfg['workload']}, {cfg['messages']:,} messages, median of {cfg['repeat']}, "
        f"{cfg['start_method']}, {report['machine']['usable_cores']} usable cores; "
        f"serial {rows[0]['serial_msgs_per_s'] / 1e3:,.1f}k msg/s"
    )
    print(format_rows(rows))
    if args.json:
        write_json({"rows": rows, "report": report}, args.json)
    return 1 if report["check_passed"] is False else 0


if __name__ == "__main__":
    sys.exit(main())
