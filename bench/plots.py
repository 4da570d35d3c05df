"""The documentation's plots, drawn from the committed JSON in ``bench/results/``.

Writes three PNGs (into ``docs/img/`` by default):

* ``throughput-workers.png``: messages per second against the worker count, ordpool and the
  best standard-library pool (at its best chunksize), on the 2-core VM
  (``2026-11-23-scaling.json``) and on a 16-core machine
  (``2026-11-22-device16/scaling2_*.json``), with serial for reference;
* ``parent-cpu.png``: the parent's CPU per message of ordpool and the standard library's pools
  on the three ``ordpool bench`` workloads (``2026-11-23-transform.json``,
  ``2026-11-23-decode.json``, ``2026-11-23-tweets.json``);
* ``latency.png``: p50, p99 and p99.9 latency per engine for the three ``--stream`` runs
  (``2026-12-07-latency-60k-r15-gate.json``, ``2026-12-07-latency-20k*-r5-overrun.json``).

Usage, from the repository root (needs matplotlib: ``pip install -e '.[docs]'``)::

    python bench/plots.py                 # writes docs/img/*.png
    python bench/plots.py --out /tmp/img
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

ORDPOOL = "#1f6fb4"
STDLIB = "#e07b28"
OTHER = "#8c8c8c"


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _scaling_rows(paths: list[Path]) -> list[dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    for path in paths:
        for row in _load(path)["rows"]:
            rows[row["workers"]] = row
    return [rows[w] for w in sorted(rows)]


def plot_throughput(plt: Any, out: Path) -> Path:
    panels = [
        ("2-core VM, CPython 3.11", _scaling_rows([RESULTS / "2026-11-23-scaling.json"])),
        (
            "16-core machine, CPython 3.12 (gVisor)",
            _scaling_rows(sorted((RESULTS / "2026-11-22-device16").glob("scaling2_*.json"))),
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, (title, rows) in zip(axes, panels):
        workers = [r["workers"] for r in rows]
        ax.plot(
            workers,
            [r["ordpool_msgs_per_s"] / 1e3 for r in rows],
            "o-",
            color=ORDPOOL,
            label="ordpool",
        )
        ax.plot(
            workers,
            [r["stdlib_msgs_per_s"] / 1e3 for r in rows],
            "s--",
            color=STDLIB,
            label="best stdlib pool (best chunksize)",
        )
        serial = sorted(r["serial_msgs_per_s"] for r in rows)[len(rows) // 2] / 1e3
        ax.axhline(serial, color=OTHER, linestyle=":", label="serial (one process)")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("workers")
        ax.set_ylabel("k messages / s")
        ax.set_xticks(workers)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(
        "Throughput against workers: transform (about 8 us of work per message)", fontsize=11
    )
    fig.tight_layout()
    path = out / "throughput-workers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_parent_cpu(plt: Any, out: Path) -> Path:
    workloads = [
        ("transform\n(594 B -> 5-tuple)", "2026-11-23-transform.json"),
        ("decode\n(594 B -> full dict)", "2026-11-23-decode.json"),
        ("tweets\n(4.6 KB -> 7-tuple)", "2026-11-23-tweets.json"),
    ]
    engines = [
        ("ordpool", "ordpool", ORDPOOL),
        ("pool", "multiprocessing.Pool.imap", STDLIB),
        ("executor", "ProcessPoolExecutor.map", "#c9a227"),
    ]
    values = {key: [] for key, _, _ in engines}
    for _, name in workloads:
        by_engine = {e["engine"]: e for e in _load(RESULTS / name)["groups"][0]["engines"]}
        for key, _, _ in engines:
            values[key].append(by_engine[key]["parent_cpu_us_per_msg"])
    fig, ax = plt.subplots(figsize=(8, 4.2))
    width = 0.26
    for i, (key, label, color) in enumerate(engines):
        xs = [x + (i - 1) * width for x in range(len(workloads))]
        bars = ax.bar(xs, values[key], width, label=label, color=color)
        ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=2)
    ax.set_xticks(range(len(workloads)), [w for w, _ in workloads])
    ax.set_ylabel("parent CPU, us per message (lower is better)")
    ax.set_title("The parent's CPU per message, 2 workers (ordpool bench, 2-core VM)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "parent-cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SHORT = {
    "ordpool": "ordpool\nenqueue",
    "ordpool-many": "ordpool\nenqueue_many",
    "ordpool-imap": "ordpool\nimap",
    "pool-imap-1": "Pool.imap\nchunk 1",
    "pool-imap-100": "Pool.imap\nchunk 100",
    "executor-submit": "Executor\n.submit",
}


def plot_latency(plt: Any, out: Path) -> Path:
    runs = [
        ("60k msg/s of 8 us (medians of 15)", "2026-12-07-latency-60k-r15-gate.json"),
        ("20k msg/s of 20 us (medians of 5)", "2026-12-07-latency-20k-r5-overrun.json"),
        (
            "20k msg/s of 20 us,\n1 in 2,000 sleeps 20 ms (medians of 5)",
            "2026-12-07-latency-20k-slow-r5-overrun.json",
        ),
    ]
    marks = [("p50_ms", "p50", 1.0), ("p99_ms", "p99", 0.6), ("p999_ms", "p99.9", 0.3)]
    fig, axes = plt.subplots(
        1, 3, figsize=(12, 4.8), sharey=True, gridspec_kw={"width_ratios": [5, 3, 3]}
    )
    for ax, (title, name) in zip(axes, runs):
        rows = _load(RESULTS / name)["rows"]
        labels = []
        for i, row in enumerate(rows):
            color = ORDPOOL if row["engine"].startswith("ordpool") else STDLIB
            for j, (field, _, alpha) in enumerate(marks):
                ax.bar(i + (j - 1) * 0.27, row[field], 0.27, color=color, alpha=alpha)
            behind = "\n(fell behind)" if row["msgs_per_s"] < 0.95 * row["rate"] else ""
            labels.append(_SHORT.get(row["engine"], row["label"]) + behind)
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("latency, ms (log scale; lower is better)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=OTHER, alpha=a) for _, _, a in marks]
    axes[1].legend(
        handles,
        [m for _, m, _ in marks],
        loc="upper right",
        fontsize=8,
        title="bars, left to right",
        title_fontsize=8,
    )
    fig.suptitle(
        "Latency from due time to result, in order (ordpool bench --stream, 2 workers, "
        "2-core VM; blue: ordpool, orange: multiprocessing / concurrent.futures)",
        fontsize=10,
    )
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs" / "img",
        help="folder for the PNGs (default: docs/img)",
    )
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "ordpool"
    args.out.mkdir(parents=True, exist_ok=True)
    for plot in (plot_throughput, plot_parent_cpu, plot_latency):
        print(plot(plt, args.out))


if __name__ == "__main__":
    main()
