"""The ``ordpool`` command line, run as users run it: ``python -m ordpool bench ...``.

Every test runs the real entry point in a subprocess, on a tiny input, and checks what it
prints or writes; none asserts a timing. ``--check`` is on wherever results flow, so each run
also proves that every engine returned serial's results in serial's order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
TINY = ("--messages", "3000", "--repeat", "1", "--workers", "1", "--check")
ENGINE_LABELS = ("serial", "ordpool", "mp.Pool.imap", "ProcessPoolExecutor.map")
VERDICTS = ("parent-bound", "worker-bound", "input-bound")


def run(
    *args: str, cwd: Path | None = None, module: str = "ordpool", timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """``python -m ordpool ARGS`` (or a script path given as ``module=None``)."""
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(
        cmd, cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def table(stdout: str) -> tuple[str, list[str], list[str]]:
    """(header line, engine rows, verdict lines) of the first worker group."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("engine "))
    end = lines.index("verdicts:", start)
    verdicts = []
    for line in lines[end + 1 :]:
        if not line.startswith("  "):
            break
        if not line.startswith("    "):
            verdicts.append(line.strip())
    return lines[start], lines[start + 2 : end], verdicts


@pytest.fixture
def user_module(tmp_path: Path) -> Path:
    """A module in a temporary directory, with an init, a fn, and misbehaving functions."""
    (tmp_path / "usermod.py").write_text(
        textwrap.dedent(
            """
            import os
            import orjson

            NOT_CALLABLE = 3

            def setup():
                return {"factor": 3}

            def work(state, raw):
                doc = orjson.loads(raw)
                return doc["x"] * state["factor"], doc["name"].upper()

            def size(raw):
                return len(raw)

            def pid(raw):
                return os.getpid()

            def boom(raw):
                raise ValueError("bad message")
            """
        )
    )
    lines = [json.dumps({"x": i, "name": f"n{i}"}) for i in range(1500)]
    (tmp_path / "in.ndjson").write_text("\n".join(lines) + "\n")
    (tmp_path / "in.json").write_text("[" + ",".join(lines[:400]) + "]")
    return tmp_path


def test_default_table_shape_and_check() -> None:
    proc = run("bench", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    header, rows, verdicts = table(proc.stdout)
    for column in (
        "engine",
        "k msg/s",
        "MB/s",
        "x serial",
        "parent us/msg",
        "worker us/msg",
        "peak RSS MB",
        "check",
    ):
        assert column in header
    assert [r.split(" (")[0].split()[0] for r in rows] == list(ENGINE_LABELS)
    assert rows[0].split()[-1] == "ref"
    assert all(r.split()[-1] == "ok" for r in rows[1:])
    assert len(verdicts) == len(ENGINE_LABELS)
    for label, verdict in zip(ENGINE_LABELS, verdicts, strict=True):
        assert verdict.startswith(label)
        assert any(f": {v}:" in verdict for v in VERDICTS), verdict
    assert "transform" in proc.stdout.splitlines()[0]
    assert "3,000 messages generated" in proc.stdout
    assert "chunksize" in proc.stdout  # which chunksize the stdlib pools got, and why
    assert "check: every engine returned serial's results in serial's order" in proc.stdout


ENGINE_KEYS = {
    "engine",
    "label",
    "workers",
    "params",
    "runs",
    "wall_s",
    "msgs_per_s",
    "mb_per_s",
    "speedup",
    "parent_cpu_us_per_msg",
    "worker_cpu_us_per_msg",
    "parent_cores",
    "worker_cores",
    "other_cores",
    "peak_rss_mb",
    "peak_parent_rss_mb",
    "verdict",
    "verdict_text",
    "ceiling_msgs_per_s",
    "check",
}


def test_json_report(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = run(
        "bench",
        "--workload",
        "decode",
        "--messages",
        "2000",
        "--message-size",
        "300",
        "--repeat",
        "2",
        "--workers",
        "1,2",
        "--engines",
        "ordpool,pool",
        "--chunksize",
        "50,500",
        "--batch-size",
        "64",
        "--check",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"schema", "machine", "config", "groups", "check_passed"}
    assert report["schema"] == "ordpool-bench/1"
    assert report["check_passed"] is True
    machine = report["machine"]
    for key in ("cpu_count", "usable_cores", "python", "platform", "date", "command_line"):
        assert machine[key]
    assert "--json" in machine["command_line"]
    config = report["config"]
    assert config["workload"] == "decode"
    assert config["messages"] == 2000
    assert config["repeat"] == 2
    assert config["workers"] == [1, 2]
    assert config["engines"] == ["serial", "ordpool", "pool"]
    assert config["batch_size"] == 64
    assert 250 <= config["avg_message_bytes"] <= 350
    assert [g["workers"] for g in report["groups"]] == [1, 2]
    for group in report["groups"]:
        engines = group["engines"]
        assert [e["engine"] for e in engines] == ["serial", "ordpool", "pool"]
        for e in engines:
            assert set(e) == ENGINE_KEYS
            assert len(e["runs"]) == 2
            assert e["msgs_per_s"] > 0
            assert e["verdict"] in VERDICTS
            assert set(e["runs"][0]) >= {"wall_s", "parent_cpu_s", "worker_cpu_s"}
        serial, ordpool, pool = engines
        assert serial["check"] == "reference" and serial["worker_cpu_us_per_msg"] is None
        assert ordpool["check"] == pool["check"] == "ok"
        assert ordpool["workers"] == pool["workers"] == group["workers"]
        assert ordpool["worker_cpu_us_per_msg"] is not None
        assert ordpool["params"]["batch_size"] == 64
        assert ordpool["params"]["batch_size_now"] == 64  # fixed: what it ran with
        assert pool["params"]["chunksize"] in (50, 500)
        assert set(pool["params"]["chunksize_sweep_s"]) <= {"50", "500"}


def test_fn_input_and_init(user_module: Path) -> None:
    proc = run(
        "bench",
        "--input",
        "in.ndjson",
        "--fn",
        "usermod:work",
        "--init",
        "usermod:setup",
        "--repeat",
        "1",
        "--workers",
        "2",
        "--check",
        "--json",
        "out.json",
        cwd=user_module,
    )
    assert proc.returncode == 0, proc.stderr
    _, rows, _ = table(proc.stdout)
    assert len(rows) == len(ENGINE_LABELS)
    assert "check: every engine returned" in proc.stdout
    report = json.loads((user_module / "out.json").read_text())
    assert report["config"]["messages"] == 1500
    assert report["config"]["fn"] == "usermod:work"
    assert report["config"]["init"] == "usermod:setup"


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_fn_json_array_input(user_module: Path, start_method: str) -> None:
    proc = run(
        "bench",
        "--input",
        "in.json",
        "--fn",
        "usermod:size",
        "--start-method",
        start_method,
        "--repeat",
        "1",
        "--workers",
        "1",
        "--engines",
        "ordpool,executor",
        "--check",
        cwd=user_module,
    )
    assert proc.returncode == 0, proc.stderr
    assert "400 messages from in.json" in proc.stdout
    assert f"start method {start_method}" in proc.stdout


def test_check_catches_a_difference(user_module: Path) -> None:
    # The worker's pid differs from the parent's: every pool must fail the check.
    proc = run(
        "bench",
        "--input",
        "in.ndjson",
        "--fn",
        "usermod:pid",
        "--engines",
        "ordpool",
        "--repeat",
        "1",
        "--workers",
        "1",
        "--check",
        cwd=user_module,
    )
    assert proc.returncode == 1
    _, rows, _ = table(proc.stdout)
    assert rows[1].split()[-1] == "FAIL"
    assert "MISMATCH at message 0" in proc.stdout
    assert "check: FAILED" in proc.stdout


@pytest.mark.parametrize(
    ("fn", "message"),
    [
        ("nosuchmodule:fn", "cannot import module 'nosuchmodule'"),
        ("usermod:missing", "has no attribute 'missing'"),
        ("usermod", "must look like module:function"),
        ("usermod:NOT_CALLABLE", "is not callable"),
    ],
)
def test_bad_fn_is_a_clear_error(user_module: Path, fn: str, message: str) -> None:
    proc = run("bench", "--fn", fn, "--input", "in.ndjson", cwd=user_module)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("ordpool bench: error: --fn")
    assert message in proc.stderr
    assert proc.stdout == ""


def test_failing_workload_is_reported(user_module: Path) -> None:
    proc = run("bench", "--fn", "usermod:boom", "--input", "in.ndjson", cwd=user_module)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "the workload failed: ValueError: bad message" in proc.stderr


def test_bad_options_and_help() -> None:
    proc = run("bench", "--workers", "0")
    assert proc.returncode == 2 and "--workers" in proc.stderr
    proc = run("bench", "--input", "/nonexistent/file")
    assert proc.returncode == 2 and "cannot read --input" in proc.stderr
    proc = run("--help")
    assert proc.returncode == 0 and "bench" in proc.stdout
    proc = run("bench", "--help")
    assert proc.returncode == 0
    for option in ("--fn", "--init", "--input", "--workers", "--batch-size", "--json"):
        assert option in proc.stdout


def test_peers_run_when_installed_and_are_skipped_when_not() -> None:
    proc = run("bench", *TINY, "--engines", "ordpool,mpire,joblib")
    assert proc.returncode == 0, proc.stderr
    _, rows, verdicts = table(proc.stdout)
    labels = [r.split("  ")[0].split(" (")[0] for r in rows]
    expected = ["serial", "ordpool"]
    for key, label in (("mpire", "mpire imap"), ("joblib", "joblib loky")):
        if importlib.util.find_spec(key) is None:
            assert f"{key} is not installed: skipped" in proc.stderr
        else:
            expected.append(label)
    assert labels == expected
    assert all(r.split()[-1] in ("ref", "ok") for r in rows)
    assert len(verdicts) == len(expected)
    assert "check: every engine returned serial's results in serial's order" in proc.stdout


def test_a_missing_peer_is_one_line_and_the_rest_runs() -> None:
    code = (
        "import sys; sys.modules['mpire'] = None\n"  # as if mpire were not installed
        "from ordpool.__main__ import main\n"
        f"sys.exit(main({['bench', *TINY, '--engines', 'ordpool,mpire']!r}))"
    )
    proc = run("-c", code, module="")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "ordpool bench: mpire is not installed: skipped "
        "(pip install mpire, or pip install 'ordpool[bench]')"
    ]
    _, rows, _ = table(proc.stdout)
    assert [r.split("  ")[0].split(" (")[0] for r in rows] == ["serial", "ordpool"]


@pytest.mark.parametrize("module", ["orjson", "rich"])
def test_without_the_bench_extra_one_line_says_what_to_install(module: str) -> None:
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"  # as if it were not installed
        "from ordpool.__main__ import main\n"
        "sys.exit(main(['bench', '--messages', '100']))"
    )
    proc = run("-c", code, module="")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"ordpool bench: {module} is not installed; install the bench extra: "
        "pip install 'ordpool[bench]'"
    ]
    proc = run("-c", code.replace("'bench', '--messages', '100'", "'--help'"), module="")
    assert proc.returncode == 0 and "bench" in proc.stdout  # the rest of the CLI still works


def test_main_signature() -> None:
    from ordpool.__main__ import main

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0


@pytest.mark.skipif(not (DATA / "twitter.json").exists(), reason="../shared/data is missing")
def test_tweets_workload(tmp_path: Path) -> None:
    ndjson = tmp_path / "tweets.ndjson"
    proc = run("bench/tweets.py", str(ndjson), "300", module="")
    assert proc.returncode == 0, proc.stderr
    lines = ndjson.read_bytes().splitlines()
    assert len(lines) == 300
    assert [json.loads(line)["id"] for line in lines[:3]] == [0, 1, 2]
    proc = run(
        "bench",
        "--input",
        str(ndjson),
        "--fn",
        "bench.tweets:project",
        "--engines",
        "ordpool,pool",
        "--repeat",
        "1",
        "--workers",
        "1",
        "--check",
    )
    assert proc.returncode == 0, proc.stderr
    assert "check: every engine returned" in proc.stdout


def test_bench_scripts_run_small(tmp_path: Path) -> None:
    proc = run("bench/memory.py", "--messages", "20000", module="")
    assert proc.returncode == 0, proc.stderr
    assert "growth" in proc.stdout and "OK" in proc.stdout
    out = tmp_path / "scaling.json"
    proc = run(
        "bench/scaling.py", "-n", "2000", "-r", "1", "--workers", "1", "--json", str(out), module=""
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["workers"] for r in rows] == [1]
    assert rows[0]["stdlib_engine"] in ("pool", "executor")
    proc = run("bench/peers.py", *TINY, "--engines", "ordpool,mpire,joblib", module="")
    assert proc.returncode == 0, proc.stderr
    assert "ordpool (batch auto)" in proc.stdout
    proc = run("bench/floor.py", "--messages", "200", "--rounds", "2", module="")
    assert proc.returncode == 0, proc.stderr
    assert "pickle.loads, chunks of" in proc.stdout and "2 cores, parent + workers" in proc.stdout
    ndjson = tmp_path / "small.ndjson"
    ndjson.write_text("".join(f'{{"id": {i}, "pad": "{"x" * 2000}"}}\n' for i in range(300)))
    proc = run(
        "bench/copyfloor.py",
        *("--input", str(ndjson), "--fn", "json:loads", "--rounds", "1", "--processes", "1"),
        module="",
    )
    assert proc.returncode == 0, proc.stderr
    assert "one copy into shared memory, alone" in proc.stdout
    proc = run("bench/contention.py", "--messages", "500", "--repeat", "1", module="")
    assert proc.returncode == 0, proc.stderr
    assert "ceiling for 2 workers" in proc.stdout
    proc = run("bench/bare.py", "--messages", "3000", "--rounds", "1", module="")
    assert proc.returncode == 0, proc.stderr  # it checks each engine's results against serial
    for engine in ("bare pool (pickle)", "bare pool (marshal)", "ordpool", "Executor", "Pool.imap"):
        assert engine in proc.stdout
    for chunksize in (100, 1000, 5000):  # each stdlib pool at each chunksize, by default
        assert f"Executor.map ({chunksize})" in proc.stdout
        assert f"Pool.imap ({chunksize})" in proc.stdout
    proc = run("bench/ab.py", "--against", "HEAD", "--messages", "3000", "--rounds", "2", module="")
    assert proc.returncode == 0, proc.stderr  # both versions' results checked against serial
    assert "new - old parent, per pair" in proc.stdout


def test_peak_rss_sees_a_peak_that_came_and_went_during_the_run():
    """The benchmark's RSS measure: a block allocated, touched and freed inside the run counts
    in its peak, though it is gone before the end (and the peak before the run does not)."""
    import psutil

    from ordpool.bench import PeakRss

    first = bytearray(200 << 20)  # a peak *before* the run, freed: it must not count
    del first
    with PeakRss([]) as rss:
        before = psutil.Process().memory_info().rss
        block = bytearray(96 << 20)  # zero-filled: every page touched
        del block
    assert rss.peak_parent == rss.peak_total
    assert rss.peak_parent >= before + (80 << 20)
    assert rss.peak_parent < before + (150 << 20)


def test_progress_bar_draws_on_steps_on_a_terminal_only(monkeypatch):
    import io

    from ordpool.bench import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm")  # rich draws no live bar on a "dumb" terminal
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        progress = Progress(2, delay=0.0)
        deadline = time.monotonic() + 10
        while drawn and "0/2" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)  # the bar shows after the delay, first drawn by its thread
        progress.step("first step")
        progress.advance()
        progress.step("second step")  # drawn at once, by the caller
        assert ("second step" in stream.getvalue()) is drawn
        progress.close()
        out = stream.getvalue()
        assert ("second step" in out and "1/2" in out) is drawn, out
        if drawn:
            assert out.endswith("\x1b[2K")  # the line is cleared at the end
