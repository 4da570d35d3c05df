"""The report: each engine's medians and verdict, the tables on stdout, and the JSON file;
and the latency table of ``--stream`` (:data:`STREAM_SCHEMA`).

The verdict names what limits an engine. Its throughput is at most
``min(cores / (work + worker overhead), 1 / parent cost per message)``: *parent-bound* when the
parent is near one core (the ceiling ``1 / parent cost`` is printed), *worker-bound* when the
workers use nearly all the cores they can have, *input-bound* when neither is busy (the
workers wait: latency, sleeps, or round trips).

The tables are drawn by rich. :func:`format_report` gives plain text (no colour, no width
limit: what tests and CI capture); :func:`print_report` prints to a stream, in colour only
when it is a terminal.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TextIO

import orjson
import psutil
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from ._runtime import usable_cores
from .engines import BenchEngine, SerialEngine
from .measure import RunStats

__all__ = [
    "COLUMNS",
    "SCHEMA",
    "STREAM_COLUMNS",
    "STREAM_SCHEMA",
    "EngineResult",
    "format_report",
    "machine_info",
    "print_report",
    "qualname",
    "summarize",
    "verdict_for",
    "write_json",
]

SCHEMA = "ordpool-bench/1"
STREAM_SCHEMA = "ordpool-bench-stream/1"  # the report of --stream (see .stream)
MB = 1e6


@dataclass
class EngineResult:
    """One engine at one worker count: the median of its timed runs, and what limits it.

    Attributes:
        engine: key (``"serial"``, ``"ordpool"``, ``"pool"``, ``"executor"``, or a peer's).
        label: as shown in the table.
        workers: worker processes (``0`` for serial).
        params: the engine's parameters (chunksize and its sweep; batch size).
        runs: every timed run.
        wall_s: median wall time.
        msgs_per_s: messages / median wall time.
        mb_per_s: input megabytes (10**6) / median wall time; ``None`` for non-bytes input.
        speedup: serial's median wall time / this engine's.
        parent_cpu_us_per_msg: median parent CPU per message, microseconds.
        worker_cpu_us_per_msg: median CPU of all workers per message (``None`` for serial).
        parent_cores: median parent CPU / wall time (1.0 = one core busy).
        worker_cores: median worker CPU / wall time.
        other_cores: median CPU of every other process on the usable cores / wall time (noise:
            above 0.1 the numbers are unreliable; the verdict says so).
        peak_rss_mb: highest parent + workers RSS seen in any run (MB = 10**6 bytes).
        peak_parent_rss_mb: highest parent RSS.
        verdict: ``"parent-bound"``, ``"worker-bound"`` or ``"input-bound"``.
        verdict_text: the verdict with the numbers behind it.
        ceiling_msgs_per_s: ``1 / parent CPU per message`` (what the parent allows).
        check: ``"ok"``, ``"reference"`` (serial), a ``"MISMATCH..."`` line, or ``None``.
    """

    engine: str
    label: str
    workers: int
    params: dict[str, Any]
    runs: list[RunStats]
    wall_s: float
    msgs_per_s: float
    mb_per_s: float | None
    speedup: float | None
    parent_cpu_us_per_msg: float
    worker_cpu_us_per_msg: float | None
    parent_cores: float
    worker_cores: float | None
    other_cores: float
    peak_rss_mb: float
    peak_parent_rss_mb: float
    verdict: str
    verdict_text: str
    ceiling_msgs_per_s: float | None
    check: str | None = None


def summarize(
    engine: BenchEngine,
    runs: list[RunStats],
    n: int,
    nbytes: int | None,
    serial_wall: float | None,
    cores: int,
) -> EngineResult:
    """Medians of ``runs``, throughput, speedup and verdict."""
    wall = statistics.median(r.wall_s for r in runs)
    parent = statistics.median(r.parent_cpu_s for r in runs)
    worker = (
        None
        if runs[0].worker_cpu_s is None
        else statistics.median(r.worker_cpu_s or 0.0 for r in runs)
    )
    other = statistics.median(r.other_cpu_s for r in runs)
    workers = 0 if isinstance(engine, SerialEngine) else engine.workers
    verdict, text, ceiling = verdict_for(workers, cores, wall, parent, worker, n, other)
    return EngineResult(
        engine=engine.key,
        label=engine.label(),
        workers=workers,
        params=engine.params(),
        runs=runs,
        wall_s=wall,
        msgs_per_s=n / wall,
        mb_per_s=None if nbytes is None else nbytes / MB / wall,
        speedup=None if serial_wall is None else serial_wall / wall,
        parent_cpu_us_per_msg=parent / n * 1e6,
        worker_cpu_us_per_msg=None if worker is None else worker / n * 1e6,
        parent_cores=parent / wall,
        worker_cores=None if worker is None else worker / wall,
        other_cores=other / wall,
        peak_rss_mb=max(r.peak_rss_bytes for r in runs) / MB,
        peak_parent_rss_mb=max(r.peak_parent_rss_bytes for r in runs) / MB,
        verdict=verdict,
        verdict_text=text,
        ceiling_msgs_per_s=ceiling,
    )


def verdict_for(
    workers: int,
    cores: int,
    wall: float,
    parent_cpu: float,
    worker_cpu: float | None,
    n: int,
    other_cpu: float = 0.0,
) -> tuple[str, str, float | None]:
    """What limits an engine: ``(verdict, one line with the numbers, parent ceiling msg/s)``.

    ``workers`` is 0 for serial (everything runs in the parent). The workers' budget is what
    the machine leaves them: ``min(workers, cores - parent - other processes)``, in cores.

    >>> verdict_for(2, 2, 1.0, 0.95, 0.9, 100_000)[0]
    'parent-bound'
    >>> verdict_for(2, 2, 1.0, 0.2, 1.7, 100_000)[0]
    'worker-bound'
    >>> verdict_for(2, 2, 1.0, 0.05, 0.1, 1_000)[0]
    'input-bound'
    >>> verdict_for(2, 2, 1.0, 0.1, 0.7, 100_000, other_cpu=1.1)[1]  # doctest: +ELLIPSIS
    'worker-bound: workers at 0.70 of the 0.80 cores left to them ... busy: ...'
    """
    parent_cores = parent_cpu / wall if wall > 0 else 0.0
    others = other_cpu / wall if wall > 0 else 0.0
    ceiling = n / parent_cpu if parent_cpu > 0 else None
    noise = (
        f"; machine busy: other processes took {others:.2f} core, numbers unreliable"
        if others >= 0.1
        else ""
    )
    if parent_cores >= 0.8:
        where = "one process" if workers == 0 else "parent"
        limit = f"ceiling {_rate(ceiling)} msg/s" if ceiling else "no ceiling"
        us = parent_cpu / n * 1e6
        text = f"parent-bound: {where} at {parent_cores:.2f} core, {us:.2f} us/msg -> {limit}"
        return "parent-bound", text + noise, ceiling
    if not workers or worker_cpu is None:
        text = f"input-bound: one process at {parent_cores:.2f} core: it waits"
        return "input-bound", f"{text} (latency, sleeps, input){noise}", ceiling
    budget = min(float(workers), max(cores - parent_cores - others, 0.25))
    used = worker_cpu / wall if wall > 0 else 0.0
    if used >= 0.75 * budget:
        text = (
            f"worker-bound: workers at {used:.2f} of the {budget:.2f} cores left to them "
            f"({workers} worker{'s' * (workers > 1)}, {cores} cores, parent {parent_cores:.2f})"
        )
        return "worker-bound", text + noise, ceiling
    text = (
        f"input-bound: parent {parent_cores:.2f} core, workers {used:.2f} of {budget:.2f} "
        f"cores: they wait (latency, sleeps, round trips or input)"
    )
    return "input-bound", text + noise, ceiling


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def machine_info(command_line: str = "") -> dict[str, Any]:
    """The machine and the software, for the JSON report."""
    from .. import __version__

    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": command_line,
        "ordpool": __version__,
        "orjson": orjson.__version__,
        "psutil": psutil.__version__,
        "loadavg_at_start": load,
    }


def qualname(fn: Callable[..., Any]) -> str:
    """``"module:qualname"`` of a callable, for the report."""
    module = getattr(fn, "__module__", None) or "?"
    return f"{module}:{getattr(fn, '__qualname__', repr(fn))}"


def write_json(report: dict[str, Any], path: str) -> None:
    """Write ``report`` to ``path`` (indented JSON)."""
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


# -- the text report -----------------------------------------------------------------------------

COLUMNS = (
    "engine",
    "k msg/s",
    "MB/s",
    "x serial",
    "parent us/msg",
    "worker us/msg",
    "peak RSS MB",
    "check",
)

# A rule under the header, dashes per column, and nothing else: plain ASCII for logs.
_RULED_HEAD = box.Box("    \n    \n -  \n    \n    \n    \n    \n    \n", ascii=True)
_UNLIMITED = 10_000  # columns: a table is never wrapped or cropped (a terminal wraps it)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _check_cell(check: str | None) -> Text:
    if check == "ok":
        return Text("ok", style="green")
    if check == "reference":
        return Text("ref")
    return Text("FAIL", style="bold red")


def _table(group: dict[str, Any], show_check: bool) -> Table:
    """One worker count's table: first column left-aligned, the numbers right-aligned."""
    table = Table(
        box=_RULED_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), expand=False
    )
    for i, column in enumerate(COLUMNS if show_check else COLUMNS[:-1]):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    for e in group["engines"]:
        row: list[RenderableType] = [
            e["label"],
            _num(e["msgs_per_s"] / 1e3, ",.1f"),
            _num(e["mb_per_s"], ",.1f"),
            _num(e["speedup"], ".2f"),
            _num(e["parent_cpu_us_per_msg"], ".2f"),
            _num(e["worker_cpu_us_per_msg"], ".2f"),
            _num(e["peak_rss_mb"], ",.0f"),
        ]
        if show_check:
            row.append(_check_cell(e["check"]))
        table.add_row(*row)
    return table


def _header(report: dict[str, Any]) -> list[RenderableType]:
    cfg, machine = report["config"], report["machine"]
    size = cfg["avg_message_bytes"]
    source = f"from {cfg['input']}" if cfg["input"] else "generated"
    title = f"ordpool bench: {cfg['workload']}" + (
        f" ({cfg['description']})" * bool(cfg["description"])
    )
    sizes = "" if size is None else f", {size:,.0f} B avg ({cfg['input_bytes'] / MB:,.1f} MB)"
    runs = f"median of {cfg['repeat']} run{'s' * (cfg['repeat'] > 1)}"
    return [
        Text(title, style="bold"),
        Text(
            f"{cfg['messages']:,} messages {source}{sizes}; {runs}; "
            f"start method {cfg['start_method']}; {machine['usable_cores']} usable cores; "
            f"Python {machine['python']}"
        ),
    ]


def _verdicts(group: dict[str, Any]) -> list[RenderableType]:
    lines: list[RenderableType] = [Text("verdicts:")]
    for e in group["engines"]:
        lines.append(Text(f"  {e['label']}: {e['verdict_text']}"))
        if "chunksize_choice" in e["params"]:
            lines.append(Text(f"    {e['params']['chunksize_choice']}"))
        if e["check"] and e["check"].startswith("MISMATCH"):
            lines.append(Text(f"    check: {e['check']}", style="red"))
    return lines


def report_renderables(report: dict[str, Any]) -> list[RenderableType]:
    """The text report, piece by piece: a header, then per worker count a table and a
    verdict per engine, then the check's outcome (for ``--stream``: the latency tables)."""
    if report["schema"] == STREAM_SCHEMA:
        return stream_renderables(report)
    parts = _header(report)
    for group in report["groups"]:
        parts += [Text(""), Text(f"workers={group['workers']}", style="bold")]
        parts += [_table(group, report["config"]["check"]), *_verdicts(group)]
    if report["check_passed"] is not None:
        parts.append(Text(""))
        if report["check_passed"]:
            parts.append(Text("check: every engine returned serial's results in serial's order"))
        else:
            parts.append(Text("check: FAILED (see above)", style="bold red"))
    return parts


def print_report(report: dict[str, Any], stream: TextIO) -> None:
    """Print the report to ``stream``: in colour on a terminal, plain text anywhere else."""
    tty = stream.isatty()
    console = Console(
        file=stream,
        width=_UNLIMITED,
        force_terminal=tty,
        color_system="auto" if tty else None,
        highlight=False,
        soft_wrap=True,
    )
    for part in report_renderables(report):
        console.print(part, crop=False)


def format_report(report: dict[str, Any]) -> str:
    """The report as plain text: a header, then per worker count a table and a verdict per
    engine."""
    out = io.StringIO()
    print_report(report, out)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


# -- the --stream report -------------------------------------------------------------------------

# Columns of the --stream table: (title, row field, format, scale). The slow-item columns show
# with --slow-every, the reorder-buffer ones where some row has them (ordpool's stats).
STREAM_COLUMNS = (
    ("k msg/s", "msgs_per_s", ",.1f", 1e-3),
    ("done", "items_done", ",d", 1),
    ("p50 ms", "p50_ms", ",.2f", 1),
    ("p99 ms", "p99_ms", ",.2f", 1),
    ("p99.9 ms", "p999_ms", ",.2f", 1),
    ("max ms", "max_ms", ",.2f", 1),
    ("parent us/msg", "parent_cpu_us_per_msg", ".2f", 1),
)
_SLOW_COLUMNS = (
    ("before-slow p50 ms", "before_slow_p50_ms", ",.2f", 1),
    ("other p50 ms", "other_p50_ms", ",.2f", 1),
)
_HOLD_COLUMNS = (
    ("hold s", "hold_seconds", ",.3f", 1),
    ("max hold ms", "max_hold_seconds", ",.2f", 1e3),
    ("held KB", "held_bytes", ",.1f", 1e-3),
)
_BEHIND = 0.95  # an engine that sustained less than this share of the rate fell behind


def _stream_header(report: dict[str, Any]) -> list[RenderableType]:
    cfg, machine = report["config"], report["machine"]
    slow = (
        f"; every {cfg['slow_every']:,}th item sleeps {cfg['slow_ms']:g} ms instead"
        if cfg["slow_every"]
        else ""
    )
    return [
        Text(
            f"ordpool bench --stream: {cfg['rate']:,.0f} msg/s for {cfg['duration_s']:g} s "
            f"({cfg['items_per_run']:,} items per engine), open loop{_runs(cfg)}",
            style="bold",
        ),
        Text(
            f"{cfg['work_us']:g} us of CPU per item{slow}; start method {cfg['start_method']}; "
            f"{machine['usable_cores']} usable cores; Python {machine['python']}"
        ),
        Text(
            "latency: from each item's due time (start + i / rate) to its result reaching the "
            "consumer, in order"
        ),
    ]


def _runs(cfg: dict[str, Any]) -> str:
    """``", median of 5 runs each (round-robin)"``, or nothing for one run."""
    repeat = cfg.get("repeat", 1)
    return f", median of {repeat} runs each (round-robin)" if repeat > 1 else ""


def _stream_table(rows: list[dict[str, Any]], columns: tuple[Any, ...]) -> Table:
    table = Table(
        box=_RULED_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0), expand=False
    )
    table.add_column("engine", justify="left", no_wrap=True)
    for title, *_ in columns:
        table.add_column(title, justify="right", no_wrap=True)
    for row in rows:
        cells = [
            _num(None if row[field] is None else row[field] * scale, fmt)
            for _, field, fmt, scale in columns
        ]
        table.add_row(row["label"], *cells)
    return table


def _stream_notes(rows: list[dict[str, Any]]) -> list[RenderableType]:
    """A line per engine that did not keep up with the rate."""
    notes: list[RenderableType] = []
    for row in rows:
        if row["msgs_per_s"] < _BEHIND * row["rate"]:
            notes.append(
                Text(
                    f"  {row['label']}: fell behind: sustained {_rate(row['msgs_per_s'])} of "
                    f"{_rate(row['rate'])} msg/s; the backlog is in its latency"
                )
            )
    return [Text("notes:"), *notes] if notes else []


def stream_renderables(report: dict[str, Any]) -> list[RenderableType]:
    """The ``--stream`` report: a header, then per worker count a latency table, and a note
    per engine that fell behind."""
    rows = report["rows"]
    columns = STREAM_COLUMNS + _SLOW_COLUMNS * bool(report["config"]["slow_every"])
    if any(row[field] is not None for row in rows for _, field, _, _ in _HOLD_COLUMNS):
        columns += _HOLD_COLUMNS
    parts = _stream_header(report)
    for workers in dict.fromkeys(row["workers"] for row in rows):
        group = [row for row in rows if row["workers"] == workers]
        parts += [Text(""), Text(f"workers={workers}", style="bold")]
        parts += [_stream_table(group, columns), *_stream_notes(group)]
    return parts
