"""``ordpool bench --stream``: the open-loop latency mode.

The pure parts (schedule, percentiles, the split around slow items) are tested directly; the
moving parts (pacer, producer, recorder) without a pool; the command line end to end in a
subprocess, on short runs. No test asserts a timing: only that every item was measured, once,
in order, and that the report has its fields.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ordpool.bench import report as report_module
from ordpool.bench.config import StreamCheckError, StreamConfig
from ordpool.bench.latency import (
    BEFORE_SLOW,
    Schedule,
    is_slow,
    percentile,
    summarize_latencies,
)
from ordpool.bench.openloop import (
    Items,
    Pacer,
    Producer,
    Recorder,
    fine_timer_slack,
    wait_until,
)
from ordpool.bench.stream import StreamResult, median_row, open_loop, warm_items
from ordpool.bench.stream_engines import StreamEngine
from ordpool.bench.workloads import stream_work

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``python -m ordpool ARGS`` in the repository root."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ordpool", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- the schedule --------------------------------------------------------------------------------


def test_due_times_are_start_plus_i_over_rate() -> None:
    schedule = Schedule(rate=4.0, total=5, start=100.0)
    assert [schedule.due(i) for i in range(5)] == [100.0, 100.25, 100.5, 100.75, 101.0]
    assert Schedule.for_duration(60_000, 5).total == 300_000
    assert Schedule.for_duration(3, 0.1).total == 1  # at least one item


@pytest.mark.parametrize("rate", [3.0, 7.0, 1000.0, 60_000.0, 33_333.3])
def test_due_count_agrees_with_due_at_every_boundary(rate: float) -> None:
    schedule = Schedule(rate=rate, total=2000, start=12345.678)
    assert schedule.due_count(schedule.start - 1e-6) == 0
    for i in range(2000):
        at = schedule.due(i)
        assert schedule.due_count(at) == i + 1  # item i is due at its own due time
        before = math.nextafter(at, -math.inf)
        assert schedule.due_count(before) == i  # and not a hair earlier
    assert schedule.due_count(schedule.start + 1e9) == 2000  # never more than total


def test_latencies_are_measured_from_the_due_time() -> None:
    schedule = Schedule(rate=10.0, total=3, start=5.0)
    received = [5.5, 5.5, 5.75]  # item 0 took 0.5 s; item 1, due at 5.1, waited for it
    assert schedule.latencies(received) == pytest.approx([0.5, 0.4, 0.55])


def test_warm_up_size() -> None:
    assert warm_items(60_000, 5) == 10_000
    assert warm_items(2_000, 1) == 400
    assert warm_items(10, 10) == 100


# -- percentiles and the slow-item split ---------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 99.9) == 100.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0.5) == 1.0
    assert percentile([7.0], 99.9) == 7.0
    thousand = [float(v) for v in range(1000)]
    assert percentile(thousand, 99.9) == 998.0  # an observed value, no interpolation
    assert percentile(thousand, 50) == 499.0


@pytest.mark.parametrize("q", [0, -1, 100.1])
def test_percentile_rejects_bad_input(q: float) -> None:
    with pytest.raises(ValueError, match="q must be"):
        percentile([1.0], q)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_slow_items_and_the_items_before_them() -> None:
    assert [i for i in range(30) if is_slow(i, 10)] == [9, 19, 29]
    assert not any(is_slow(i, None) for i in range(30))
    # 25 items, every 10th slow (9 and 19): 4, 5, 6, 7, 8 and 14..18 come just before one;
    # 20..24 are followed by no slow item within the run: they count as "other".
    latencies = []
    for i in range(25):
        if is_slow(i, 10):
            latencies.append(0.030)
        elif 0 < 9 - i % 10 <= BEFORE_SLOW and i < 19:
            latencies.append(0.004)
        else:
            latencies.append(0.001)
    summary = summarize_latencies(latencies, slow_every=10)
    assert summary.slow_items == 2
    assert summary.slow_p50_ms == pytest.approx(30.0)
    assert summary.before_slow_p50_ms == pytest.approx(4.0)
    assert summary.other_p50_ms == pytest.approx(1.0)
    assert summary.max_ms == pytest.approx(30.0)
    plain = summarize_latencies(latencies, slow_every=None)
    assert plain.before_slow_p50_ms is None and plain.slow_items == 0


# -- the work, the items, the recorder -----------------------------------------------------------


def test_stream_work_returns_its_index() -> None:
    assert stream_work((41, 3.0, 0.0)) == 41
    assert stream_work((42, 0.0, 0.5)) == 42  # a slow one sleeps instead
    assert Items(8.0, 3, 20.0)(2) == (2, 8.0, 20.0)
    assert Items(8.0, None, 20.0)(2) == (2, 8.0, 0.0)


def test_recorder_accepts_the_items_in_order_only() -> None:
    rec = Recorder(3, "demo")
    for i in range(3):
        rec.receive(i)
    rec.finish()
    assert rec.count == 3 and all(t > 0 for t in rec.received)
    with pytest.raises(StreamCheckError, match="more results than the 3 items due"):
        rec.receive(3)  # a result beyond the last item

    rec = Recorder(3, "demo")
    rec.receive(0)
    with pytest.raises(StreamCheckError, match="got the result of item 2 where item 1"):
        rec.receive(2)  # item 1 lost (or reordered)

    rec = Recorder(3, "demo")
    rec.receive(0)
    with pytest.raises(StreamCheckError, match="item 0 where item 1"):
        rec.receive(0)  # a duplicate

    rec = Recorder(3, "demo")
    rec.receive(0)
    with pytest.raises(StreamCheckError, match="1 results for 3 items due"):
        rec.finish()


# -- the pacer and the producer ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_pacer_hands_out_every_item_once_never_early() -> None:
    schedule = Schedule(rate=20_000.0, total=3000, start=time.perf_counter() + 0.01)
    pacer = Pacer(schedule, Items(1.0, None, 0.0))
    seen: list[int] = []
    for batch in pacer.batches():
        now = time.perf_counter()
        assert schedule.due(batch[-1]) <= now  # every item of the batch is due
        seen.extend(batch)
    assert seen == list(range(3000))
    assert pacer.fed == 3000 and pacer.batches_fed >= 1
    assert pacer.max_lag >= pacer.mean_lag >= 0


@pytest.mark.timeout(30)
def test_pacer_with_a_tick_hands_out_what_came_due_meanwhile_in_one_batch() -> None:
    # 200 items due over 20 ms, a tick of 1 s: the first wake-up finds item 0 due, the next
    # one (a second later) all the rest, each still never early.
    schedule = Schedule(rate=10_000.0, total=200, start=time.perf_counter())
    pacer = Pacer(schedule, Items(1.0, None, 0.0), tick=1.0)
    batches = []
    for batch in pacer.batches():
        assert schedule.due(batch[-1]) <= time.perf_counter()
        batches.append(batch)
    assert [i for batch in batches for i in batch] == list(range(200))
    assert len(batches) == 2


@pytest.mark.timeout(30)
def test_pacer_blocking_items_and_stop() -> None:
    schedule = Schedule(rate=5_000.0, total=50, start=time.perf_counter())
    items = list(Pacer(schedule, Items(2.0, 10, 1.0)).blocking_items())
    assert [item[0] for item in items] == list(range(50))
    assert [item for item in items if item[2]] == [(i, 2.0, 1.0) for i in (9, 19, 29, 39, 49)]

    far = Schedule(rate=1.0, total=10, start=time.perf_counter())  # one item a second
    pacer = Pacer(far, Items(1.0, None, 0.0))
    threading.Timer(0.2, pacer.stop.set).start()
    assert [i for batch in pacer.batches() for i in batch] == [0]  # stopped while waiting


@pytest.mark.timeout(10)
def test_wait_until_returns_at_the_time_or_on_stop() -> None:
    target = time.perf_counter() + 0.01
    wait_until(target, spin=0.002)
    assert time.perf_counter() >= target
    stop = threading.Event()
    stop.set()
    wait_until(time.perf_counter() + 3600, stop)  # returns at once


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_fine_timer_slack_is_restored() -> None:
    prctl = ctypes.CDLL(None).prctl
    get_slack = 30  # PR_GET_TIMERSLACK
    before = prctl(get_slack, 0, 0, 0, 0)
    with fine_timer_slack():
        assert prctl(get_slack, 0, 0, 0, 0) == 1000
    assert prctl(get_slack, 0, 0, 0, 0) == before


@pytest.mark.timeout(30)
def test_producer_errors_win_over_what_they_cause() -> None:
    schedule = Schedule(rate=10_000.0, total=100, start=time.perf_counter())
    woken = threading.Event()

    def feed(batch: range) -> None:
        raise KeyError("from the producer")

    def consume() -> None:  # waits for results that never come, until on_error wakes it
        assert woken.wait(10)
        raise RuntimeError("a consequence")

    producer = Producer(Pacer(schedule, Items(1.0, None, 0.0)), feed, on_error=woken.set)
    with pytest.raises(KeyError, match="from the producer"):
        producer.drive(consume, abort=lambda: None)

    aborted = []

    def bad_consume() -> None:
        raise StreamCheckError("from the consumer")

    pacer = Pacer(schedule, Items(1.0, None, 0.0))
    producer = Producer(pacer, lambda batch: None, on_error=lambda: None)
    with pytest.raises(StreamCheckError, match="from the consumer"):
        producer.drive(bad_consume, abort=lambda: aborted.append(True))
    assert aborted == [True] and pacer.stop.is_set()


# -- the harness catches an engine that loses, duplicates or reorders ----------------------------


class _FakeEngine(StreamEngine):
    """No pool: results come back in this thread, after ``mangle`` rearranged them."""

    key = name = "fake"

    def __init__(self, mangle: Any) -> None:
        super().__init__(1, StreamConfig(rate=20_000.0, workers=[1], duration=0.01))
        self.mangle = mangle

    def run(self, pacer: Pacer, recorder: Recorder) -> None:
        values = [stream_work(item) for item in pacer.blocking_items()]
        for value in self.mangle(values):
            recorder.receive(value)


def _swap(values: list[int]) -> list[int]:
    values[3], values[4] = values[4], values[3]
    return values


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda v: v, None),
        (lambda v: v[:-1], "199 results for 200 items due"),
        (lambda v: [*v[:5], *v[6:]], "item 6 where item 5 was expected"),
        (lambda v: [*v[:5], 4, *v[5:]], "item 4 where item 5 was expected"),
        (_swap, "item 4 where item 3 was expected"),
        (lambda v: [*v, 200], "more results than the 200 items due"),
    ],
    ids=["in-order", "lost-last", "lost", "duplicated", "reordered", "extra"],
)
def test_open_loop_fails_loudly_on_a_bad_engine(mangle: Any, message: str | None) -> None:
    engine = _FakeEngine(mangle)
    config = StreamConfig(rate=20_000.0, workers=[1], duration=0.01, work_us=1.0)
    if message is None:
        run_ = open_loop(engine, config, config.duration)
        assert run_.recorder.count == run_.schedule.total == 200
        return
    with pytest.raises(StreamCheckError, match=message):
        open_loop(engine, config, config.duration)


# -- the report ----------------------------------------------------------------------------------


def _row(**extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "engine": "ordpool",
        "label": "ordpool enqueue (batch auto)",
        "workers": 2,
        "rate": 1000.0,
        "msgs_per_s": 999.0,
        "items_done": 1000,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "p999_ms": 3.0,
        "max_ms": 4.0,
        "parent_cpu_us_per_msg": 5.0,
        "before_slow_p50_ms": None,
        "other_p50_ms": None,
        "hold_seconds": None,
        "max_hold_seconds": None,
        "held_bytes": None,
    }
    row.update(extra)
    return row


def _report(rows: list[dict[str, Any]], slow_every: int | None = None) -> dict[str, Any]:
    return {
        "schema": report_module.STREAM_SCHEMA,
        "machine": {"usable_cores": 2, "python": "3.11.7"},
        "config": {
            "rate": 1000.0,
            "duration_s": 1.0,
            "items_per_run": 1000,
            "work_us": 8.0,
            "slow_every": slow_every,
            "slow_ms": 20.0 if slow_every else None,
            "start_method": "forkserver",
        },
        "rows": rows,
    }


def test_the_reorder_buffer_columns_show_when_the_stats_have_them() -> None:
    text = report_module.format_report(_report([_row()]))
    assert "hold s" not in text and "held KB" not in text
    held = _row(hold_seconds=0.25, max_hold_seconds=0.0031, held_bytes=12_000)
    text = report_module.format_report(_report([held, _row(engine="x", label="other")]))
    header = next(line for line in text.splitlines() if line.startswith("engine "))
    assert header.rstrip().endswith("hold s  max hold ms  held KB")
    row = next(line for line in text.splitlines() if line.startswith("ordpool enqueue"))
    assert row.split()[-3:] == ["0.250", "3.10", "12.0"]
    other = next(line for line in text.splitlines() if line.startswith("other"))
    assert other.split()[-3:] == ["-", "-", "-"]


def test_a_row_of_an_even_number_of_runs_shows_medians_and_whole_counts() -> None:
    run = StreamResult(
        "ordpool", "ordpool enqueue (batch auto)", 2, {}, 1000.0, 1000, 1000, 1.0, 999.0,
        0.005, 5.0, 1.0, 2.0, 3.0, 4.0, 1.5, 0, None, None, None, 0.1, 0.2,
    )  # fmt: skip
    row = median_row([run, replace(run, p99_ms=4.0, items_done=1000)])
    assert row["p99_ms"] == 3.0 and row["items_done"] == 1000 and row["repeat"] == 2
    report = _report([row])
    report["config"]["repeat"] = 2
    text = report_module.format_report(report)
    assert "median of 2 runs each (round-robin)" in text
    line = next(line for line in text.splitlines() if line.startswith("ordpool enqueue"))
    assert " 1,000 " in line and " 3.00 " in line


def test_an_engine_that_falls_behind_gets_a_note() -> None:
    text = report_module.format_report(_report([_row(msgs_per_s=500.0)]))
    assert "fell behind: sustained 500 of 1.0k msg/s" in text


# -- the command line ----------------------------------------------------------------------------

STREAM = ("bench", "--stream", "2000", "--duration", "1", "--workers", "2", "--work-us", "5")
STREAM += ("--repeat", "1")
LATENCY_COLUMNS = ("k msg/s", "done", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "parent us/msg")
ROW_KEYS = {
    "repeat",
    "runs",
    "engine",
    "label",
    "workers",
    "params",
    "rate",
    "items_due",
    "items_done",
    "wall_s",
    "msgs_per_s",
    "parent_cpu_s",
    "parent_cpu_us_per_msg",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "max_ms",
    "mean_ms",
    "slow_items",
    "slow_p50_ms",
    "before_slow_p50_ms",
    "other_p50_ms",
    "feed_lag_mean_ms",
    "feed_lag_max_ms",
    "hold_seconds",
    "max_hold_seconds",
    "held_bytes",
}


def stream_table(stdout: str) -> tuple[str, list[str]]:
    """(header line, engine rows) of the first worker group."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("engine "))
    rows = []
    for line in lines[start + 2 :]:
        if not line or line == "notes:" or line.startswith("workers="):
            break
        rows.append(line)
    return lines[start], rows


def stream_cells(stdout: str) -> list[dict[str, str]]:
    """The first worker group's rows as ``{column name: cell}``, cut where the rule under the
    header puts the columns."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("engine "))
    header, rule = lines[start], lines[start + 1]
    spans = [(m.start(), m.end()) for m in re.finditer(r"-+", rule)]
    names = [header[a:b].strip() for a, b in spans]
    _, rows = stream_table(stdout)
    return [{name: row[a:b].strip() for name, (a, b) in zip(names, spans)} for row in rows]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))  # (a cell that is not a number fails)


@pytest.mark.timeout(240)
def test_stream_run_measures_every_item_of_every_engine(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    engines = "ordpool,ordpool-many,ordpool-imap,pool-imap-100,executor-submit"
    proc = run(*STREAM, "--engines", engines, "--json", str(out), timeout=200)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "2,000 msg/s for 1 s (2,000 items per engine), open loop" in proc.stdout
    header, rows = stream_table(proc.stdout)
    for column in LATENCY_COLUMNS:
        assert column in header
    assert "before-slow" not in header
    labels = [
        "ordpool enqueue",
        "ordpool enqueue_many",
        "ordpool imap",
        "mp.Pool.imap",
        "ProcessPoolExecutor.submit",
    ]
    assert [r.split(" (")[0].split("  ")[0] for r in rows] == labels
    for cells in stream_cells(proc.stdout):
        names = ("k msg/s", "done", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "parent us/msg")
        rate, done, p50, p99, p999, worst, parent = (_number(cells[name]) for name in names)
        assert done == 2000
        assert 0 <= p50 <= p99 <= p999 <= worst and rate > 0 and parent > 0
    report = json.loads(out.read_text())
    assert set(report) == {"schema", "machine", "config", "rows"}
    assert report["schema"] == "ordpool-bench-stream/1"
    for key in ("cpu_count", "usable_cores", "python", "platform", "date", "command_line"):
        assert report["machine"][key]
    assert "--stream" in report["machine"]["command_line"]
    config = report["config"]
    assert config["rate"] == 2000 and config["duration_s"] == 1 and config["work_us"] == 5
    assert config["items_per_run"] == 2000 and config["engines"] == engines.split(",")
    assert [r["engine"] for r in report["rows"]] == engines.split(",")
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert row["items_done"] == row["items_due"] == 2000
        assert row["workers"] == 2 and row["slow_items"] == 0
        assert row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"] <= row["max_ms"]
    assert report["rows"][3]["params"] == {"chunksize": 100}


@pytest.mark.timeout(200)
def test_stream_repeat_runs_each_engine_and_shows_the_medians(tmp_path: Path) -> None:
    out = tmp_path / "repeat.json"
    base = STREAM[:-2]  # without "--repeat 1"
    proc = run(
        *base,
        "--repeat",
        "3",
        "--engines",
        "ordpool,pool-imap-100",
        "--json",
        str(out),
        timeout=160,
    )
    assert proc.returncode == 0, proc.stderr
    assert "median of 3 runs each (round-robin)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["config"]["repeat"] == 3
    cells = stream_cells(proc.stdout)
    for row, shown in zip(report["rows"], cells):
        assert row["repeat"] == 3 and len(row["runs"]) == 3
        for field in ("p50_ms", "p99_ms", "p999_ms", "max_ms", "msgs_per_s"):
            assert row[field] == statistics.median(run[field] for run in row["runs"])
        assert _number(shown["p99 ms"]) == pytest.approx(row["p99_ms"], abs=0.01)
        assert row["items_done"] == 2000


@pytest.mark.timeout(200)
def test_stream_slow_items_add_the_before_slow_column(tmp_path: Path) -> None:
    out = tmp_path / "slow.json"
    proc = run(
        *STREAM,
        *("--slow-every", "200", "--slow-ms", "20", "--engines", "ordpool,pool-imap-100"),
        *("--max-delay", "0.002", "--json", str(out)),
        timeout=160,
    )
    assert proc.returncode == 0, proc.stderr
    assert "every 200th item sleeps 20 ms instead" in proc.stdout
    header, rows = stream_table(proc.stdout)
    assert "before-slow p50 ms" in header and "other p50 ms" in header
    assert len(rows) == 2
    assert rows[0].startswith("ordpool enqueue (batch auto, max_delay 2 ms)")
    report = json.loads(out.read_text())
    assert report["config"]["max_delay"] == 0.002
    assert report["rows"][0]["params"]["max_delay"] == 0.002
    for cells in stream_cells(proc.stdout):  # the two slow-item columns are numbers too
        _number(cells["before-slow p50 ms"])
        _number(cells["other p50 ms"])
    for row in json.loads(out.read_text())["rows"]:
        assert row["slow_items"] == 10 and row["items_done"] == 2000
        assert row["before_slow_p50_ms"] is not None and row["other_p50_ms"] is not None


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--duration", "1"), "--duration needs --stream"),
        (("--work-us", "3"), "--work-us needs --stream"),
        (("--max-delay", "0.001"), "--max-delay needs --stream"),
        (("--stream", "100", "--fn", "json:loads"), "--fn does not apply to --stream"),
        (("--stream", "100", "--check"), "--check does not apply to --stream"),
        (("--stream", "100", "--slow-every", "10"), "--slow-every and --slow-ms go together"),
        (("--stream", "100", "--engines", "pool"), "unknown engine 'pool' for --stream"),
    ],
)
def test_stream_option_errors(args: tuple[str, ...], message: str) -> None:
    proc = run("bench", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stdout == ""
